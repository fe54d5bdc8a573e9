"""Turn pytest-benchmark JSON files into markdown tables (or, with --json, one JSON row per benchmark).

Usage: python benchmarks/summarize.py BENCH_JSON [BENCH_JSON ...] [--json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

LOSS_NOTE = ("Time: median (and min) of the rounds, one forward+backward each. Path: where the gradients are "
             "formed (grad in forward: from GEMM-computed logit chunks in the forward; recompute: the fused kernels "
             "recompute the logits in the backward; by budget: sdpo_loss's choice at the default workspace). "
             "Head: whether lm_head_weight is trained or frozen (LoRA). Effective TFLOP/s counts the row's FLOPs: "
             "for a path row, the products the step needs at the least (8·N·d·V: student and teacher logits, "
             "grad_h, grad_W; 6 with a frozen head); for the other SDPO rows 10·N·d·V (the recompute path's, which "
             "computes the student logits twice); for Liger's cross entropy 6·N·d·V. "
             "x cuBLAS: median time / cuBLAS time of the matrix products the row's FLOPs count, same run. "
             "Peak: growth of peak memory over the inputs during one fwd+bwd (CUDA allocator, or process RSS on "
             "CPU). `*` marks the backend that backend=\"auto\" picks.")
PATHS = {None: "by budget", True: "grad in forward", False: "recompute"}


def rows(benches: list[dict]) -> list[dict]:
    """One flat row per benchmark: name, group, time statistics in seconds, extra_info fields."""
    return [{"name": b["name"], "group": b["group"], "median_s": b["stats"]["median"], "min_s": b["stats"]["min"],
             "rounds": b["stats"]["rounds"], **b["extra_info"]} for bench in benches for b in bench["benchmarks"]]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _machine(bench: dict) -> str:
    info = bench["machine_info"]
    extra = info.get("sdpo_fast", {})
    parts = [f"CPU: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}",
             f"GPU: {extra.get('gpu') or 'none'}", f"Python {info.get('python_version', '?')}"]
    parts += [f"{k} {extra[k]}" for k in ("torch", "cuda", "triton", "liger_kernel", "torch_threads") if extra.get(k)]
    commit = bench.get("commit_info", {})
    if re.fullmatch(r"[0-9a-f]{40}", commit.get("id") or ""):
        parts.append(f"commit {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    return " · ".join(parts)


def markdown(benches: list[dict]) -> str:
    """The first file's machine line, then one table of loss steps and one of the other benchmarks."""
    table = rows(benches)
    loss = [r for r in table if "backend" in r]
    kernels = [r for r in table if "kernels" in r]
    tiles = [r for r in table if "tile_kernels" in r]
    other = [r for r in table if "backend" not in r and "kernels" not in r and "tile_kernels" not in r]
    out = [_machine(benches[0]), ""]
    if loss:
        out += ["### sdpo_loss forward+backward", "", LOSS_NOTE, "",
                "| device | dtype | N | d | V | backend | path | head | FLOPs | median s | min s | rounds | TFLOP/s "
                "| model TFLOP/s | x cuBLAS | peak MiB | peak / reference |",
                "|---|---|--:|--:|--:|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in loss:
            peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
            out.append(" | ".join([
                f"| {r['device']}", r["dtype"], str(r["n"]), str(r["d"]), str(r["vocab"]),
                r["backend"] + (" *" if r.get("default_backend") else ""), PATHS[r.get("grad_in_forward")],
                "frozen" if r.get("frozen_head") else "trained",
                _fmt(r.get("flops") and f"{r['flops'] / (r['n'] * r['d'] * r['vocab']):.0f}·N·d·V", ""),
                _fmt(r["median_s"], ".4g"),
                _fmt(r["min_s"], ".4g"), str(r["rounds"]), _fmt(r.get("tflops"), ".3g"),
                _fmt(r.get("predicted_tflops"), ".3g"),
                _fmt(r.get("x_cublas"), ".2f"), _fmt(peak, ".0f"), _fmt(r.get("peak_vs_reference"), ".1%")]) + " |")
        out.append("")
    for r in kernels:
        out += [f"### Fused-path kernels vs the traffic model ({r.get('gpu_model') or 'no model for this GPU'}), "
                f"{r['dtype']} N={r['n']} d={r['d']} V={r['vocab']}", "",
                "| kernel | measured ms | TFLOP/s | model ms | model TFLOP/s | same GEMM in cuBLAS ms |",
                "|---|--:|--:|--:|--:|--:|"]
        total = sum(k["measured_s"] for k in r["kernels"].values())
        for name, k in r["kernels"].items():
            out.append(f"| {name} | {k['measured_s'] * 1e3:.2f} | {k['tflops']:.0f} "
                       f"| {_fmt(k['predicted_s'] and k['predicted_s'] * 1e3, '.2f')} "
                       f"| {_fmt(k['predicted_tflops'], '.0f')} | {k['cublas_s'] * 1e3:.2f} |")
        step_flops = 10 * r["n"] * r["d"] * r["vocab"]
        cublas = sum(k["cublas_s"] for k in r["kernels"].values())
        out += [f"| whole step (10·N·d·V) | {total * 1e3:.1f} | {step_flops / total / 1e12:.0f} "
                f"| {_fmt(r.get('predicted_step_s') and r['predicted_step_s'] * 1e3, '.1f')} "
                f"| {_fmt(r.get('predicted_step_tflops'), '.0f')} | {cublas * 1e3:.1f} |", ""]
    for r in tiles:
        out += [f"### Recompute kernels at the previous and the new tiles ({r['gpu']}), {r['dtype']} N={r['n']} "
                f"d={r['d']} V={r['vocab']}", "",
                "Tiles (block_n, block_v, block_d, warps, stages): " + "; ".join(
                    f"{name}: " + ", ".join(f"{k} {tuple(v)}" for k, v in cfgs.items())
                    for name, cfgs in r["tiles"].items()), "",
                "| kernel | previous ms | previous TFLOP/s | new ms | new TFLOP/s | new / previous |",
                "|---|--:|--:|--:|--:|--:|"]
        previous, new = r["tile_kernels"]["previous"], r["tile_kernels"]["new"]
        for name in new:
            out.append(f"| {name} | {previous[name]['seconds'] * 1e3:.2f} | {previous[name]['tflops']:.0f} "
                       f"| {new[name]['seconds'] * 1e3:.2f} | {new[name]['tflops']:.0f} "
                       f"| {r['new_over_previous'][name]:.3f} |")
        out.append("")
    if other:
        out += ["### Other benchmarks", "", "| benchmark | median s | min s | rounds | extra |",
                "|---|--:|--:|--:|---|"]
        for r in other:
            extra = ", ".join(f"{k}={v}" for k, v in r.items()
                              if k not in ("name", "group", "median_s", "min_s", "rounds"))
            out.append(f"| {r['name']} | {r['median_s']:.4g} | {r['min_s']:.4g} | {r['rounds']} | {extra} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", help="files written by pytest --benchmark-json")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    args = parser.parse_args(argv)
    benches = []
    for path in args.bench_json:
        with open(path) as f:
            benches.append(json.load(f))
    print(json.dumps(rows(benches), indent=1) if args.json else markdown(benches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
