"""BENCHMARKS.md's table of candidate tiles for the recompute kernels (lse_gather, grad_logits, grad_weight), bf16,
compiled ahead of time per architecture (no GPU).

Usage: python benchmarks/tile_table.py [--arch 80,89,90] [--shape qwen3-8b] [--json]
writes the table into BENCHMARKS.md between its two markers; --json prints the rows instead.

Each candidate replaces one kernel's config in `kernel_configs` (the others stay as shipped); the launches of one
loss step are built by `check.step_launches` with it, so the JIT specialization is the real one, and each distinct
specialization is compiled (`check.compile_launch`: registers, spills, shared memory, programs/SM, pipeline depth,
the matrix instruction's shape from the SASS). Candidates whose operand buffers alone exceed the arch's shared
memory per block are not compiled. The traffic model (`kernels/model.py`) then predicts the kernel's HBM bytes and
time and the whole step's time on the arch's reference GPU (`gpus.GPU_OF_ARCH`) with that tile, at the model's
stated, tile-independent efficiency factors: only HBM traffic, occupancy and wave quantization can move it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_table import write_between_markers  # noqa: E402

from sdpo_fast.kernels import check  # noqa: E402
from sdpo_fast.kernels.config import KernelConfig, kernel_configs  # noqa: E402
from sdpo_fast.kernels.gpus import arch_limits, gpu_for_arch  # noqa: E402
from sdpo_fast.kernels.model import EFFICIENCY, model_step  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN = "<!-- tile_table.py: begin -->"
END = "<!-- tile_table.py: end -->"
KERNELS = ("lse_gather", "grad_logits", "grad_weight")


def _logits_tile(block_n, block_v, block_d, warps, stages):
    return KernelConfig(block_n, block_v, block_d, warps, stages, "tf32")


# (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) of the kernels that sweep (BLOCK_N, BLOCK_V) logits tiles.
LOGITS_CANDIDATES = [_logits_tile(*t) for t in [
    (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 4), (128, 128, 32, 4, 3),
    (64, 128, 32, 4, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (256, 128, 32, 16, 3),
    (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
]]
# grad_weight's (BLOCK_V, 2 x block_d) output tile over block_d tokens per step (`grad_weight.launch_meta`).
GRAD_WEIGHT_CANDIDATES = [_logits_tile(128, v, d, warps, stages) for v, d, warps, stages in [
    (128, 32, 8, 3), (128, 32, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
    (64, 64, 4, 3), (256, 32, 8, 3), (256, 32, 8, 4), (256, 64, 8, 3), (256, 64, 8, 2),
]]
CANDIDATES = {"lse_gather": LOGITS_CANDIDATES, "grad_logits": LOGITS_CANDIDATES,
              "grad_weight": GRAD_WEIGHT_CANDIDATES}


def tile(kernel: str, cfg: KernelConfig) -> tuple[int, int, int]:
    """(rows, columns, reduction) of the kernel's product tile: (BLOCK_N, BLOCK_V, BLOCK_D), or grad_weight's
    (BLOCK_V, BLOCK_D, BLOCK_K)."""
    if kernel == "grad_weight":
        return cfg.block_v, 2 * cfg.block_d, cfg.block_d
    return cfg.block_n, cfg.block_v, cfg.block_d


def operand_buffer_bytes(kernel: str, cfg: KernelConfig, arch: int) -> int:
    """Shared memory of the 16-bit operand tiles in flight: num_stages buffers on sm_90, num_stages - 1 before (as
    the TTGIR shows: `check.pipeline_stages`), each (rows + columns) x reduction x 2 bytes."""
    rows, cols, depth = tile(kernel, cfg)
    buffers = cfg.num_stages if arch >= 90 else max(1, cfg.num_stages - 1)
    return buffers * (rows + cols) * depth * 2


def compile_candidate(kernel: str, cfg: KernelConfig, shape, dtype, arch: int) -> list:
    """KernelUsage of each distinct specialization of `kernel` in one loss step with `cfg` (grad_weight: the first
    chunk's and the accumulating chunks')."""
    gpu = gpu_for_arch(arch)
    cfgs = {**kernel_configs(dtype, arch), kernel: cfg}
    launches = [launch for launch in check.step_launches(shape, dtype, gpu, True, cfgs, lse_programs_per_sm=1)
                if launch.kernel.__name__ == f"{kernel}_kernel"]
    return [check.compile_launch(launch, arch) for launch in check.distinct(launches, arch)]


def rows(archs: list[int], shape, dtype=torch.bfloat16) -> list[dict]:
    out = []
    for arch in archs:
        gpu = gpu_for_arch(arch)
        shipped = kernel_configs(dtype, arch)
        shipped_usages = {kernel: compile_candidate(kernel, shipped[kernel], shape, dtype, arch) for kernel in KERNELS}
        for kernel in KERNELS:
            for cfg in CANDIDATES[kernel]:
                row = dict(kernel=kernel, arch=arch, gpu=gpu.name, tile="x".join(map(str, tile(kernel, cfg))),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, shipped=cfg == shipped[kernel],
                           operand_buffer_bytes=operand_buffer_bytes(kernel, cfg, arch), config=dataclasses.asdict(cfg))
                if row["operand_buffer_bytes"] > arch_limits(arch).shared_per_block:
                    out.append(dict(row, compiled=False))
                    continue
                start = time.perf_counter()
                usages = shipped_usages[kernel] if row["shipped"] else compile_candidate(kernel, cfg, shape, dtype, arch)
                row.update(compiled=True, compile_seconds=time.perf_counter() - start,
                           builds=[u.as_dict() for u in usages])
                if all(not u.spills and u.fits_shared and u.programs_per_sm >= 1 for u in usages):
                    others = [u for k in KERNELS if k != kernel for u in shipped_usages[k]]
                    step = model_step(shape, dtype, gpu, usages=others + usages, cfgs={**shipped, kernel: cfg})
                    prediction = next(k for k in step.kernels if k.kernel == kernel)
                    row.update(kernel_hbm_gb=prediction.hbm_bytes / 1e9, kernel_ms=prediction.seconds * 1e3,
                               kernel_bound=prediction.bound, step_ms=step.seconds * 1e3)
                out.append(row)
                print(f"sm_{arch} {kernel} {row['tile']} w{cfg.num_warps} s{cfg.num_stages}: "
                      f"{[(u.registers, u.stack_bytes + u.local_bytes, u.shared_bytes) for u in usages]} "
                      f"{row.get('step_ms', 'not modelled')}", file=sys.stderr, flush=True)
    return out


def markdown(table: list[dict], shape) -> str:
    lines = ["| kernel | arch | tile | warps | stages (buffers) | matrix instruction | registers | spills (B) "
             "| shared KB | programs/SM | kernel HBM GB | kernel ms | step ms |",
             "|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    skipped = []
    for r in table:
        name = f"**{r['kernel']}** (shipped)" if r["shipped"] else r["kernel"]
        if not r["compiled"]:
            skipped.append(f"{r['kernel']} sm_{r['arch']} {r['tile']} w{r['num_warps']} s{r['num_stages']} "
                           f"({r['operand_buffer_bytes'] // 1024} KB)")
            continue
        builds = r["builds"]

        def joined(key, fmt=str):
            return "/".join(fmt(b[key]) for b in builds)

        modelled = "kernel_ms" in r
        lines.append(
            f"| {name} | sm_{r['arch']} | {r['tile']} | {r['num_warps']} | {r['num_stages']} "
            f"({joined('pipeline_stages')}) | {builds[0]['mma']}.{builds[0]['mma_shape']} | {joined('registers')} "
            f"| {'/'.join(str(b['stack_bytes'] + b['local_bytes']) for b in builds)} "
            f"| {joined('shared_bytes', lambda x: f'{x / 1024:.0f}')} | {joined('programs_per_sm')} "
            + (f"| {r['kernel_hbm_gb']:.1f} | {r['kernel_ms']:.1f} | {r['step_ms']:.1f} |" if modelled
               else "| – | – | – |"))
    n, d, v = shape
    notes = [f"bf16, N, d, V = {n}, {d}, {v}; the model on {', '.join(sorted({r['gpu'] for r in table}))} "
             f"(`gpus.GPU_OF_ARCH`). Tile: BLOCK_N x BLOCK_V x BLOCK_D (lse_gather, grad_logits) or grad_weight's "
             "BLOCK_V x BLOCK_D x BLOCK_K; a/b: grad_weight's first chunk / accumulating chunks. Not modelled (–): "
             "a build spills or does not fit."]
    if skipped:
        notes.append("Not compiled, operand buffers over the shared memory per block: " + "; ".join(skipped) + ".")
    notes.append(EFFICIENCY.describe())
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,89,90", help="comma-separated compute capabilities")
    parser.add_argument("--shape", default="qwen3-8b", choices=sorted(check.SHAPES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = check.SHAPES[args.shape]
    table = rows([int(a) for a in args.arch.split(",")], shape)
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        write_between_markers(BENCHMARKS, markdown(table, shape), BEGIN, END)
        print(f"{len(table)} rows written into {BENCHMARKS}")


if __name__ == "__main__":
    main()
