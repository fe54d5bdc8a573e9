"""BENCHMARKS.md's table of simulated peak memory (`sdpo-fast plan`): configurations x micro-batch budgets.

Usage: python benchmarks/plan_table.py [--model qwen3-8b] [--budget-gib 24] [--tokens 4160,8192] [--json]
writes the table into BENCHMARKS.md between its two markers (the docs link there, never copy it); --json prints
the rows instead.

Each row is `simulate` on fake tensors (no GPU), bf16, the default 2048 + 2048-token limits, the worst-case batch:
two micro-batches of the budget on each GPU (gradients accumulate), except `--offload-optimizer`, where one
micro-batch makes the step (torchao copies each offloaded gradient instead of adding it, so only a one-micro-batch
step is right there). Several GPUs: the memory of one of them (rank 0).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.plan import GIB, interaction, load_config, simulate

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN = "<!-- plan_table.py: begin -->"
END = "<!-- plan_table.py: end -->"

CONFIGURATIONS = [
    # (name, TrainConfig options, GPUs, micro-batches per GPU in the step)
    ("LoRA r16 (bf16 adapters, fp32 masters; default)", dict(lora_r=16), 1, 2),
    ("LoRA r16, `--lora-dtype float32`", dict(lora_r=16, lora_dtype="float32"), 1, 2),
    ("LoRA r64 (alpha 128)", dict(lora_r=64, lora_alpha=128), 1, 2),
    ("QLoRA r16 (`--load-in-4bit`, NF4)", dict(lora_r=16, load_in_4bit=True), 1, 2),
    ("full, `--offload-optimizer` (one micro-batch per step)", dict(offload_optimizer=True,
                                                                   gradient_checkpointing=True), 1, 1),
    ("full, `--optimizer-in-backward`", dict(optimizer_in_backward=True, gradient_checkpointing=True), 1, 2),
    ("full, torchrun + FSDP2, 2 GPUs", dict(gradient_checkpointing=True), 2, 2),
    ("full, torchrun + FSDP2, 4 GPUs", dict(gradient_checkpointing=True), 4, 2),
    ("full, torchrun + FSDP2, 8 GPUs", dict(gradient_checkpointing=True), 8, 2),
]


def rows(model: str, budget_bytes: int, token_budgets: list[int]) -> list[dict]:
    hf_config = load_config(model)
    longest = max(len(interaction(2048, 2048, 1000).student_input_ids),
                  len(interaction(2048, 2048, 1000).teacher_input_ids))
    out = []
    for name, options, gpus, micro_batches in CONFIGURATIONS:
        for tokens in token_budgets:
            per_micro_batch = max(1, tokens // longest)
            config = TrainConfig(model=model, dtype="bfloat16", micro_batch_tokens=tokens,
                                 batch_size=per_micro_batch * micro_batches * gpus, **options).validate()
            start = time.perf_counter()
            plan = simulate(config, hf_config, world_size=gpus)
            out.append(dict(configuration=name, gpus=gpus, micro_batch_tokens=tokens,
                            student_tokens=plan.micro_batch_tokens, peak_gib=plan.peak_bytes / GIB,
                            total_gib=plan.total_bytes / GIB, fits=plan.fits(budget_bytes),
                            peak_phase=plan.peak_phase, seconds=time.perf_counter() - start))
    return out


def markdown(table: list[dict], budget_gib: float) -> str:
    lines = [f"| configuration | --micro-batch-tokens | micro-batches per GPU (student tokens) | simulated peak "
             f"GiB per GPU | + allowances | fits {budget_gib:g} GiB | peak during |",
             "|---|--:|---|--:|--:|:-:|---|"]
    for r in table:
        parts = r["student_tokens"]
        shown = f"{len(parts)} x {parts[0]}" if len(set(parts)) == 1 else " + ".join(map(str, parts))
        lines.append(f"| {r['configuration']} | {r['micro_batch_tokens']} | {shown} | {r['peak_gib']:.2f} | "
                     f"{r['total_gib']:.2f} | {'yes' if r['fits'] else 'no'} | {r['peak_phase']} |")
    return "\n".join(lines)


def write_between_markers(path: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between `begin` and `end` in the file at path (each on a line of its own) by table."""
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs one {begin!r} line followed by one {end!r} line (the table's markers)")
    before, rest = text.split(begin)
    path.write_text(f"{before}{begin}\n{table}\n{end}{rest.split(end)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--tokens", default="4160,8192", help="comma-separated --micro-batch-tokens values")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = rows(args.model, int(args.budget_gib * GIB), [int(t) for t in args.tokens.split(",")])
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        write_between_markers(BENCHMARKS, markdown(table, args.budget_gib))
        print(f"{len(table)} rows written into {BENCHMARKS}")


if __name__ == "__main__":
    main()
