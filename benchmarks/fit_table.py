"""BENCHMARKS.md's table of what `--fit` chooses (`sdpo-fast plan --fit`) for Qwen3-8B at several budgets.

Usage: python benchmarks/fit_table.py [--model qwen3-8b] [--budgets 24,48,80] [--jobs 1] [--json]
writes the table into BENCHMARKS.md between its two markers; --json prints the rows instead.

Each row is `fit.fit` with no searched option set (checkpointed layers, activation offload and micro_batch_tokens
chosen), bf16, the default 2048 + 2048-token limits and batch_size 32, except `--offload-optimizer`: batch_size 1,
so that a step is one micro-batch (torchao's constraint, `step.check_micro_batches`). The modelled step time is
`fit.step_time` on an H100 SXM5 (its assumptions are printed under the table), against every layer
checkpointed. The last row is the activation-offload goal: LoRA r16, every layer checkpointed and offloaded,
one 2048 + 2048-token interaction per micro-batch, simulated. Search seconds: wall time on the machine that ran
it (stated with the table).
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from plan_table import write_between_markers

from sdpo_fast.kernels.gpus import GPUS
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.fit import assumptions, fit
from sdpo_fast.train.plan import GIB, interaction, load_config, simulate

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN = "<!-- fit_table.py: begin -->"
END = "<!-- fit_table.py: end -->"
GPU = GPUS["h100"]

CONFIGURATIONS = [
    ("LoRA r16", dict(lora_r=16)),
    ("QLoRA r16 (`--load-in-4bit`)", dict(lora_r=16, load_in_4bit=True)),
    ("full, `--offload-optimizer` (batch 1)", dict(offload_optimizer=True, batch_size=1)),
]


def _row(model: str, name: str, options: dict, budget_gib: float) -> dict:
    hf_config = load_config(model)
    config = TrainConfig(model=model, dtype="bfloat16", **options).validate()
    start = time.perf_counter()
    result = fit(config, {}, int(budget_gib * GIB), hf_config=hf_config, gpu=GPU)
    row = dict(configuration=name, budget_gib=budget_gib, search_seconds=time.perf_counter() - start,
               simulations=sum(c.plan is not None for c in result.candidates),
               all_layers_step_seconds=result.baseline.total_seconds)
    if result.chosen is not None:
        row.update(result.to_json()["fit"], total_gib=result.chosen.plan.total_bytes / GIB)
    return row


def _goal(model: str) -> dict:
    hf_config = load_config(model)
    longest = interaction(2048, 2048, 1000)
    tokens = max(len(longest.student_input_ids), len(longest.teacher_input_ids))
    config = TrainConfig(model=model, dtype="bfloat16", lora_r=16, checkpoint_layers=hf_config.num_hidden_layers,
                         offload_activations=True, micro_batch_tokens=tokens).validate()
    plan = simulate(config, hf_config)
    return dict(configuration="goal: LoRA r16, `--offload-activations`, every layer, one interaction per "
                              f"micro-batch ({plan.micro_batch_tokens[0]} student tokens)",
                peak_bytes=plan.peak_bytes, total_gib=plan.total_bytes / GIB)


def rows(model: str, budgets: list[float], jobs: int = 1) -> list[dict]:
    """The table's rows, computed by `jobs` processes."""
    tasks = [(model, name, options, b) for name, options in CONFIGURATIONS for b in budgets]
    with ProcessPoolExecutor(jobs) as pool:
        goal = pool.submit(_goal, model)
        out = list(pool.map(_row, *zip(*tasks)))
        return out + [goal.result()]


def markdown(table: list[dict]) -> str:
    lines = ["| configuration | budget GiB | --fit chose | layers checkpointed | simulated peak GiB (+ allowances) "
             "| recompute share of FLOPs | modelled step s | every layer checkpointed: s | search s (simulations) |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in table:
        if "budget_gib" not in r:
            lines.append(f"| {r['configuration']} | | | | {r['peak_bytes'] / GIB:.2f} ({r['total_gib']:.2f}) "
                         "| | | | |")
        elif "flags" not in r:
            lines.append(f"| {r['configuration']} | {r['budget_gib']:g} | nothing fits | | | | | "
                         f"{r['all_layers_step_seconds']:.2f} | {r['search_seconds']:.0f} ({r['simulations']}) |")
        else:
            lines.append(f"| {r['configuration']} | {r['budget_gib']:g} | `{' '.join(r['flags'])}` "
                         f"| {r['checkpoint_layers']}/{r['num_layers']} | {r['peak_bytes'] / GIB:.2f} "
                         f"({r['total_gib']:.2f}) | {r['recompute_fraction']:.1%} | {r['modelled_step_seconds']:.2f} "
                         f"| {r['all_layers_step_seconds']:.2f} | {r['search_seconds']:.0f} ({r['simulations']}) |")
    return "\n".join(lines + ["", assumptions(GPU)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--budgets", default="24,48,80", help="comma-separated budgets in GiB")
    parser.add_argument("--jobs", type=int, default=1, help="processes simulating at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = rows(args.model, [float(b) for b in args.budgets.split(",")], args.jobs)
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        write_between_markers(BENCHMARKS, markdown(table), BEGIN, END)
        print(f"{len(table)} rows written into {BENCHMARKS}")


if __name__ == "__main__":
    main()
