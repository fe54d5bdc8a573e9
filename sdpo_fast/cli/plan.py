"""`sdpo-fast plan`: predicted peak GPU memory of one training step, from the model config alone."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    parser.add_argument("--model", required=True, metavar="ID_OR_CONFIG",
                        help="local model directory or config.json, Hub id, or a known shape (qwen3-8b)")
    parser.add_argument("--lora-r", type=int, default=0, metavar="R", help="LoRA rank (default 0: full fine-tuning)")
    parser.add_argument("--lora-target-modules", default="all-linear", metavar="NAMES", help="comma-separated")
    parser.add_argument("--seq", type=int, default=2048, metavar="N", help="prompt tokens (default 2048)")
    parser.add_argument("--completion", type=int, default=2048, metavar="N", help="completion tokens (default 2048)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, metavar="N",
                        help="packed student tokens per micro-batch (default: one interaction)")
    parser.add_argument("--optimizer", default="adamw8bit", choices=["adamw", "adamw8bit", "sgd"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory to compare with (default 24)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.plan import format_plan, load_config, plan_memory

    for name in ("seq", "completion", "lora_r", "micro_batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "lora_r" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'lora_r' else 1}, got {value}")
    plan = plan_memory(load_config(args.model), dtype=getattr(torch, args.dtype), lora_r=args.lora_r,
                       lora_target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
                       optimizer=args.optimizer, prompt_tokens=args.seq, completion_tokens=args.completion,
                       micro_batch_tokens=args.micro_batch_tokens, gradient_checkpointing=args.gradient_checkpointing)
    print(format_plan(plan, args.budget_gib))
    return 0
