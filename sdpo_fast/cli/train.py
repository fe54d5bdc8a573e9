"""`sdpo-fast train`: offline SDPO (or the SFT baseline) on logged conversations; by default the bundled tiny model
on its bundled sample (CPU, about a minute), ending with a before/after style report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..train.config import PRESETS, TrainConfig, load_yaml, resolve_config
from .flags import add_dataclass_flags, given_fields


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help=__doc__.split(":", 1)[1].strip(), description=__doc__,
        epilog="Precedence: defaults < --preset < --config file < flags. Flags default to the config value shown "
               "in `TrainConfig` (sdpo_fast/train/config.py); list values are comma-separated.")
    add_config_flags(parser)
    add_fit_flags(parser, "on CUDA when no option it searches is set (flag or config file); --no-fit: never")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def add_config_flags(parser) -> None:
    """--config and one flag per TrainConfig field (shared by `train` and `plan`)."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (same names as the flags, with _)")
    add_dataclass_flags(parser, TrainConfig, choices={"preset": sorted(PRESETS)})


def add_fit_flags(parser, default: str) -> None:
    """--fit and --budget-gib (shared by `train` and `plan`); `default` says when --fit runs unasked."""
    parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                        help="before loading weights, choose the checkpointed layers, --offload-activations and "
                             "--micro-batch-tokens (those not set) for the least modelled step time whose simulated "
                             f"peak fits --budget-gib; printed with its step-time model (default: {default})")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="GPU memory to fit in (default: the CUDA device's free memory, else 24)")


def config_from_args(args: argparse.Namespace, *, validate: bool = True) -> TrainConfig:
    """The resolved config: the --config file's values under the flags actually given. With --resume, the
    config saved in the output directory comes first, so `--output-dir DIR --resume` alone continues a run.
    validate False: left to `train`, which validates once."""
    return resolve_config(*_sources(args), validate=validate)


def explicit_options(args: argparse.Namespace) -> dict:
    """The options the user set: the config files' values (with --resume, the saved run's) and the flags given."""
    file_values, overrides = _sources(args)
    return {**file_values, **overrides}


def _sources(args: argparse.Namespace) -> tuple[dict, dict]:
    file_values = load_yaml(args.config) if args.config else {}
    overrides = given_fields(args, TrainConfig)
    output_dir = overrides.get("output_dir", file_values.get("output_dir"))
    if overrides.get("resume", file_values.get("resume")) and output_dir:
        saved = Path(output_dir) / "config.yaml"
        if saved.is_file():
            file_values = {**load_yaml(saved), **file_values}
    return file_values, overrides


def fitted(config: TrainConfig, args: argparse.Namespace, device_type: str, log) -> tuple[TrainConfig, dict | None]:
    """(`config` with what --fit chose, the choice as logged) when --fit runs (`fit.runs_fit`), else (`config`,
    None); ValueError when no reachable configuration fits."""
    import dataclasses

    from ..demo.assets import tiny_model_path
    from ..train.fit import budget_bytes, fit, runs_fit

    given = explicit_options(args)
    if not runs_fit(args.fit, given, device_type):
        return config, None
    result = fit(dataclasses.replace(config, model=config.model or str(tiny_model_path())), given,
                 budget_bytes(args.budget_gib), log=log)
    if result.chosen is None:
        raise ValueError(result.refusal())
    log(result.describe())
    return dataclasses.replace(result.config, model=config.model), result.to_json()["fit"]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import single_thread

    from ..train.setup import resolve_device

    config = config_from_args(args, validate=False)
    config, args.fit_choice = fitted(config, args, resolve_device(config.device).type, _say)
    try:
        with single_thread(enabled=config.model is None):
            return _train_and_report(config, args)
    except torch.OutOfMemoryError:
        raise ValueError("out of GPU memory: lower --micro-batch-tokens, or enable --gradient-checkpointing, "
                         "or train LoRA adapters (--lora-r 16)") from None


def _train_and_report(config: TrainConfig, args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.trainer import objective_of

    summary = train(config, progress=not args.no_progress, fit=getattr(args, "fit_choice", None))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    first, last = summary["first"], summary["last"]
    model = config.model or "bundled tiny Qwen3"
    print(f"trained {model}: {summary['steps']}/{summary['total_steps']} steps over {summary['interactions']} "
          f"interactions, {summary['tokens']} tokens in {summary['seconds']:.1f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s)")
    if first is not None:
        key = objective_of(config).signal_name
        print(f"loss {first['loss']:.4f} -> {last['loss']:.4f}; {key.replace('_', ' ')} "
              f"{first[key]:+.4f} -> {last[key]:+.4f}")
    if summary.get("data"):
        from ..train.trainer import describe_counts

        print(describe_counts(summary["data"]))
    print(f"checkpoint: {summary['checkpoint']}; metrics: {summary['output_dir']}/metrics.jsonl")
    if config.model is None and config.data is None:
        from ..demo import REPORT_PROMPTS, preferred_rate
        from ..train.setup import load_model_and_tokenizer

        before, after = (preferred_rate(*load_model_and_tokenizer(config, ckpt, training=False))
                         for ckpt in (None, Path(summary["checkpoint"])))
        print(f"preferred style (no emojis, not degenerate) in the model's own replies to {REPORT_PROMPTS} held-out requests, "
              f"no hindsight: {before:.0%} before -> {after:.0%} after {config.loss}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
