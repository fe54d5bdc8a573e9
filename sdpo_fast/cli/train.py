"""`sdpo-fast train`: offline SDPO (or the SFT baseline) on logged conversations; by default the bundled tiny model
on its bundled sample (CPU, about a minute), ending with a before/after style report."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..train.config import PRESETS, TrainConfig, load_yaml, resolve_config
from .flags import add_dataclass_flags, given_fields


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help=__doc__.split(":", 1)[1].strip(), description=__doc__,
        epilog="Precedence: defaults < --preset < --config file < flags. Flags default to the config value shown "
               "in `TrainConfig` (sdpo_fast/train/config.py); list values are comma-separated.")
    add_config_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def add_config_flags(parser) -> None:
    """--config and one flag per TrainConfig field (shared by `train` and `plan`)."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (same names as the flags, with _)")
    add_dataclass_flags(parser, TrainConfig, choices={"preset": sorted(PRESETS)})


def config_from_args(args: argparse.Namespace, *, validate: bool = True) -> TrainConfig:
    """The resolved config: the --config file's values under the flags actually given. With --resume, the
    config saved in the output directory comes first, so `--output-dir DIR --resume` alone continues a run.
    validate False: left to `train`, which validates once."""
    file_values = load_yaml(args.config) if args.config else {}
    overrides = given_fields(args, TrainConfig)
    output_dir = overrides.get("output_dir", file_values.get("output_dir"))
    if overrides.get("resume", file_values.get("resume")) and output_dir:
        saved = Path(output_dir) / "config.yaml"
        if saved.is_file():
            file_values = {**load_yaml(saved), **file_values}
    return resolve_config(file_values, overrides, validate=validate)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import single_thread

    config = config_from_args(args, validate=False)
    try:
        with single_thread(enabled=config.model is None):
            return _train_and_report(config, args)
    except torch.OutOfMemoryError:
        raise ValueError("out of GPU memory: lower --micro-batch-tokens, or enable --gradient-checkpointing, "
                         "or train LoRA adapters (--lora-r 16)") from None


def _train_and_report(config: TrainConfig, args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.trainer import objective_of

    summary = train(config, progress=not args.no_progress)
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
