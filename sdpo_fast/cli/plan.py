"""`sdpo-fast plan`: peak GPU memory of `sdpo-fast train`'s step with the same flags, measured on fake tensors."""
from __future__ import annotations

import argparse
import json
import sys

from .train import add_config_flags, add_fit_flags, config_from_args, explicit_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help=__doc__.split(":", 1)[1].strip(), description=__doc__,
        epilog="Takes every `train` flag (same defaults); --model also accepts a config.json or a known shape "
               "(qwen3-0.6b, qwen3-4b, qwen3-8b, llama-3.1-8b). The step runs in bfloat16 unless --dtype says "
               "otherwise.")
    add_config_flags(parser)
    add_fit_flags(parser, "off")
    parser.add_argument("--world-size", type=int, default=1,
                        help="GPUs of a torchrun job (FSDP2), at most 1024: memory of one of them (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.assets import tiny_model_path
    from ..train.fit import budget_bytes, fit
    from ..train.plan import MAX_WORLD_SIZE, format_plan, load_config, simulate
    from ..utils.checks import check_number

    check_number("--budget-gib", args.budget_gib, positive=True, optional=True)
    if not 1 <= args.world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"--world-size must be in [1, {MAX_WORLD_SIZE}], got {args.world_size} (the simulated step "
                         "holds a batch world-size times as large, so its time grows with it)")
    if args.fit and args.world_size != 1:
        raise ValueError("--fit plans one GPU; drop --world-size (or --fit)")
    config = config_from_args(args)
    hf_config = load_config(config.model or str(tiny_model_path()))
    budget = budget_bytes(args.budget_gib)
    if args.fit:
        result = fit(config, explicit_options(args), budget,
                     hf_config=hf_config, log=lambda line: print(line, file=sys.stderr, flush=True))
        if result.chosen is None:
            raise ValueError(result.refusal())
        plan = result.chosen.plan
        print(json.dumps({**result.to_json(), **plan.to_json(budget)}) if args.json
              else f"{result.describe()}\n{format_plan(plan, budget)}")
        return 0
    plan = simulate(config, hf_config, world_size=args.world_size)
    print(json.dumps(plan.to_json(budget)) if args.json else format_plan(plan, budget))
    return 0

