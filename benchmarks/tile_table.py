"""BENCHMARKS.md's table of candidate tiles for the recompute kernels (lse_gather, grad_logits, grad_weight), bf16,
compiled ahead of time per architecture (no GPU).

Usage: python benchmarks/tile_table.py [--arch 80,89,90] [--shape qwen3-8b] [--json | --save]
writes the table into BENCHMARKS.md between its two markers; --json prints the rows instead; --save records this
Triton's sweep in benchmarks/tile_sweeps/triton-VERSION.json instead. A tile is picked only if it also passes in
every recorded sweep of another Triton version (the supported range, 3.6-3.9, compiles the same kernel
differently: sm_80's grad_logits at 256x128x64 spills 48 B on 3.6 and 3.7, none on 3.8 and 3.9). To refresh:
`--save` under each older Triton, then a plain run under the newest.

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
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from plan_table import write_between_markers

from sdpo_fast.kernels import check
from sdpo_fast.kernels.config import COMMON_TILE, KernelConfig, kernel_configs
from sdpo_fast.kernels.gpus import arch_limits, gpu_for_arch
from sdpo_fast.kernels.grad_weight import launch_meta as grad_weight_meta
from sdpo_fast.kernels.model import EFFICIENCY, model_step

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
SWEEPS = Path(__file__).resolve().parent / "tile_sweeps"
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
    (BLOCK_V, BLOCK_D, BLOCK_K) as its `launch_meta` maps the config."""
    if kernel == "grad_weight":
        meta = grad_weight_meta(cfg)
        return meta["BLOCK_V"], meta["BLOCK_D"], meta["BLOCK_K"]
    return cfg.block_n, cfg.block_v, cfg.block_d


def fill_bytes_per_kflop(kernel: str, cfg: KernelConfig) -> float:
    """Bytes of 16-bit operands copied into shared memory per 1000 FLOPs of the product tile: (rows + columns) x
    reduction x 2 bytes per 2 x rows x columns x reduction FLOPs."""
    rows, cols, _ = tile(kernel, cfg)
    return 1000 * (rows + cols) / (rows * cols)


def operand_buffer_bytes(kernel: str, cfg: KernelConfig, arch: int) -> int:
    """Shared memory of the 16-bit operand tiles in flight: num_stages buffers on sm_90, num_stages - 1 before (as
    the TTGIR shows: `check.pipeline_stages`), each (rows + columns) x reduction x 2 bytes."""
    rows, cols, depth = tile(kernel, cfg)
    buffers = cfg.num_stages if arch >= 90 else max(1, cfg.num_stages - 1)
    return buffers * (rows + cols) * depth * 2


def compile_candidate(kernel: str, cfg: KernelConfig, shape, dtype, arch: int) -> list[tuple]:
    """(KernelUsage, mma_per_ldsm) of each distinct specialization of `kernel` in one loss step with `cfg`
    (grad_weight: the first chunk's and the accumulating chunks'); mma_per_ldsm: the SASS's HMMA count over its LDSM
    count (shared-memory operand loads into registers; None for HGMMA, which reads its shared operands itself)."""
    gpu = gpu_for_arch(arch)
    cfgs = {**kernel_configs(dtype, arch), kernel: cfg}
    launches = [launch for launch in check.step_launches(shape, dtype, gpu, True, cfgs, lse_programs_per_sm=1)
                if launch.kernel.__name__ == f"{kernel}_kernel"]
    builds = []
    with tempfile.TemporaryDirectory() as sass_dir:
        for launch in check.distinct(launches, arch):
            usage = check.compile_launch(launch, arch, sass_dir)
            listing = next(Path(sass_dir).glob("*.sass"))
            hmma, ldsm = (len(re.findall(rf"\b{op}\b", listing.read_text())) for op in ("HMMA", "LDSM"))
            builds.append((usage, hmma / ldsm if hmma and ldsm else None))
            listing.unlink()
    return builds


def rows(archs: list[int], shape, dtype=torch.bfloat16) -> list[dict]:
    out = []
    for arch in archs:
        gpu = gpu_for_arch(arch)
        shipped = kernel_configs(dtype, arch)
        shipped_builds = {kernel: compile_candidate(kernel, shipped[kernel], shape, dtype, arch) for kernel in KERNELS}
        for kernel in KERNELS:
            for cfg in CANDIDATES[kernel]:
                row = dict(kernel=kernel, arch=arch, gpu=gpu.name, tile="x".join(map(str, tile(kernel, cfg))),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, shipped=cfg == shipped[kernel],
                           previous=cfg == COMMON_TILE, fill_bytes_per_kflop=fill_bytes_per_kflop(kernel, cfg),
                           operand_buffer_bytes=operand_buffer_bytes(kernel, cfg, arch), config=dataclasses.asdict(cfg))
                if row["operand_buffer_bytes"] > arch_limits(arch).shared_per_block:
                    out.append(dict(row, compiled=False))
                    continue
                start = time.perf_counter()
                builds = shipped_builds[kernel] if row["shipped"] else \
                    compile_candidate(kernel, cfg, shape, dtype, arch)
                usages = [usage for usage, _ in builds]
                row.update(compiled=True, compile_seconds=time.perf_counter() - start,
                           builds=[dict(usage.as_dict(), mma_per_ldsm=ratio) for usage, ratio in builds])
                if all(not u.spills and u.fits_shared and u.programs_per_sm >= 1 for u in usages):
                    others = [usage for k in KERNELS if k != kernel for usage, _ in shipped_builds[k]]
                    step = model_step(shape, dtype, gpu, usages=others + usages, cfgs={**shipped, kernel: cfg})
                    prediction = next(k for k in step.kernels if k.kernel == kernel)
                    row.update(kernel_hbm_gb=prediction.hbm_bytes / 1e9, kernel_ms=prediction.seconds * 1e3,
                               kernel_bound=prediction.bound, step_ms=step.seconds * 1e3)
                out.append(row)
                print(f"sm_{arch} {kernel} {row['tile']} w{cfg.num_warps} s{cfg.num_stages}: "
                      f"{[(u.registers, u.stack_bytes + u.local_bytes, u.shared_bytes) for u in usages]} "
                      f"{row.get('step_ms', 'not modelled')}", file=sys.stderr, flush=True)
    return out


SLACK = 1e-4
"""Relative slack of "no worse" in the model's figures: float noise, not a margin."""


def hgmma_n(row: dict) -> int:
    """N of the row's HGMMA shape (64xNx16), 0 for HMMA."""
    shape = row["builds"][0]["mma_shape"]
    return int(shape.split("x")[1]) if "x" in shape else 0


def passes(row: dict, base: dict) -> bool:
    """The decision's criteria against the kernel's COMMON_TILE row on the same arch: every build spill-free, within
    shared memory, at least one program per SM (else not modelled); the model's HBM bytes for the kernel and time for
    the whole step no worse; a larger product tile (fewer fill bytes per FLOP), on sm_90 with no narrower HGMMA."""
    if "step_ms" not in row:
        return False
    return (row["kernel_hbm_gb"] <= base["kernel_hbm_gb"] * (1 + SLACK)
            and row["step_ms"] <= base["step_ms"] * (1 + SLACK)
            and row["fill_bytes_per_kflop"] < base["fill_bytes_per_kflop"] and hgmma_n(row) >= hgmma_n(base))


def preference(row: dict) -> tuple:
    """Among passing rows: the largest tile, then the widest HGMMA, the most HMMA per LDSM, the most programs per SM,
    the deeper reduction block (fewer loop iterations per FLOP), the least shared memory."""
    builds = row["builds"]
    return (-row["fill_bytes_per_kflop"], hgmma_n(row), min(b["mma_per_ldsm"] or 0 for b in builds),
            tuple(b["programs_per_sm"] for b in builds), row["config"]["block_d"],
            -max(b["shared_bytes"] for b in builds))


def _passing(table: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(kernel, arch) -> the compiled rows that pass against that kernel's COMMON_TILE row of the same table."""
    out = {}
    for base in (r for r in table if r["previous"]):
        key = base["kernel"], base["arch"]
        out[key] = [r for r in table if (r["kernel"], r["arch"]) == key and r["compiled"] and passes(r, base)]
    return out


def _config_key(row: dict) -> tuple:
    return row["kernel"], row["arch"], tuple(sorted(row["config"].items()))


def passing_configs(table: list[dict]) -> set[tuple]:
    """The (kernel, arch, config) of every row of a sweep that passes the criteria in that sweep."""
    return {_config_key(r) for rows_ in _passing(table).values() for r in rows_}


def choose(table: list[dict], others: list[dict] = ()) -> dict[tuple[str, int], dict]:
    """(kernel, arch) -> the row the criteria pick: the most preferred row of `table` that passes there and in every
    sweep of `others` (another Triton's rows, `sweep_record`), else the COMMON_TILE row."""
    elsewhere = [passing_configs(other["rows"]) for other in others]
    picks = {}
    for key, passing in _passing(table).items():
        passing = [r for r in passing if all(_config_key(r) in ok for ok in elsewhere)]
        picks[key] = max(passing, key=preference) if passing else \
            next(r for r in table if r["previous"] and (r["kernel"], r["arch"]) == key)
    return picks


def sweep_record(table: list[dict], version: str) -> dict:
    """The sweep of Triton `version` as `choose` reads it for another version: each row's decision fields only."""
    fields = ("kernel", "arch", "config", "previous", "compiled", "fill_bytes_per_kflop", "step_ms", "kernel_hbm_gb")
    build_fields = ("mma_shape", "mma_per_ldsm", "programs_per_sm", "shared_bytes", "registers", "stack_bytes",
                    "local_bytes")
    return {"triton": version,
            "rows": [dict({k: r[k] for k in fields if k in r},
                          builds=[{k: b[k] for k in build_fields} for b in r.get("builds", ())]) for r in table]}


def dump_sweep(record: dict) -> str:
    """A recorded sweep as JSON text, one row per line."""
    rows_ = ",\n".join(json.dumps(r, separators=(",", ":")) for r in record["rows"])
    return f'{{"triton": {json.dumps(record["triton"])}, "rows": [\n{rows_}\n]}}\n'


def other_tritons(row: dict, others: list[dict], passing: list[set]) -> str:
    """How the row's config fared in each other Triton's sweep (`passing`: each one's `passing_configs`): ok (passes
    the criteria; the common tile: builds cleanly), its spills, fails (another criterion), not compiled (shared
    memory), not swept."""
    out = []
    for other, ok in zip(others, passing):
        found = next((r for r in other["rows"] if _config_key(r) == _config_key(row)), None)
        spilled = sum(b["stack_bytes"] + b["local_bytes"] for b in found["builds"]) if found else 0
        if found is None or not found["compiled"]:
            verdict = "not swept" if found is None else "not compiled"
        elif spilled:
            verdict = f"{spilled} B spilled"
        elif _config_key(row) in ok or (row["previous"] and "step_ms" in found):
            verdict = "ok"
        else:
            verdict = "fails"
        out.append(f"{other['triton']}: {verdict}")
    return "; ".join(out)


def markdown(table: list[dict], shape, others: list[dict] = ()) -> str:
    lines = ["| kernel | arch | tile | warps | stages (buffers) | tile is | fill B/kFLOP | matrix instruction "
             "| HMMA/LDSM | registers | spills (B) | shared KB | programs/SM | kernel HBM GB | kernel ms | step ms "
             "| other Tritons |",
             "|---|---|---|--:|--:|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    skipped = []
    passing = [passing_configs(other["rows"]) for other in others]
    for r in table:
        roles = ", ".join(role for role, key in (("before", "previous"), ("picked", "picked"), ("shipped", "shipped"))
                          if r[key])
        name = f"**{r['kernel']}**" if r["shipped"] else r["kernel"]
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
            f"({joined('pipeline_stages')}) | {roles} | {r['fill_bytes_per_kflop']:.1f} "
            f"| {builds[0]['mma']}.{builds[0]['mma_shape']} "
            f"| {joined('mma_per_ldsm', lambda x: '–' if x is None else f'{x:.1f}')} | {joined('registers')} "
            f"| {'/'.join(str(b['stack_bytes'] + b['local_bytes']) for b in builds)} "
            f"| {joined('shared_bytes', lambda x: f'{x / 1024:.0f}')} | {joined('programs_per_sm')} "
            + (f"| {r['kernel_hbm_gb']:.1f} | {r['kernel_ms']:.1f} | {r['step_ms']:.1f} " if modelled
               else "| – | – | – ") + f"| {other_tritons(r, others, passing)} |")
    n, d, v = shape
    notes = [f"Triton {triton.__version__}; other Tritons: the same config in the sweeps recorded in "
             f"`benchmarks/tile_sweeps/` ({', '.join(o['triton'] for o in others) or 'none'}): ok, passes the "
             "criteria there too (a tile is picked only then); else its spills, or fails (another criterion). "
             f"bf16, N, d, V = {n}, {d}, {v}; the model on {', '.join(sorted({r['gpu'] for r in table}))} "
             f"(`gpus.GPU_OF_ARCH`). Tile: BLOCK_N x BLOCK_V x BLOCK_D (lse_gather, grad_logits) or grad_weight's "
             "BLOCK_V x BLOCK_D x BLOCK_K; a/b: grad_weight's first chunk / accumulating chunks. Tile is: before, "
             "the tile every kernel used before the sweep (`config.COMMON_TILE`); picked, what the criteria choose "
             "(`benchmarks/tile_table.py` `passes`, `preference`); shipped (bold), `kernel_config`'s. Fill "
             "B/kFLOP: operand bytes copied into shared memory per 1000 FLOPs of the tile, (rows + columns) / (rows x "
             "columns). HMMA/LDSM: matrix instructions per shared-memory operand load in the SASS (static counts; "
             "operand reuse in registers; HGMMA reads shared memory itself). Not modelled (–): a build spills or "
             "does not fit."]
    if skipped:
        notes.append("Not compiled, operand buffers over the shared memory per block: " + "; ".join(skipped) + ".")
    notes.append(EFFICIENCY.describe())
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,89,90", help="comma-separated compute capabilities")
    parser.add_argument("--shape", default="qwen3-8b", choices=sorted(check.SHAPES))
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the rows instead of writing BENCHMARKS.md")
    output.add_argument("--save", action="store_true", help=f"record this Triton's sweep in {SWEEPS.name}/")
    args = parser.parse_args()
    shape = check.SHAPES[args.shape]
    table = rows([int(a) for a in args.arch.split(",")], shape)
    if args.save:
        path = SWEEPS / f"triton-{triton.__version__}.json"
        SWEEPS.mkdir(exist_ok=True)
        path.write_text(dump_sweep(sweep_record(table, triton.__version__)))
        print(f"{len(table)} rows recorded in {path}")
        return
    others = sorted((json.loads(p.read_text()) for p in SWEEPS.glob("triton-*.json")), key=lambda o: o["triton"])
    others = [o for o in others if o["triton"] != triton.__version__]
    picks = choose(table, others)
    for row in table:
        row["picked"] = picks.get((row["kernel"], row["arch"])) is row
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        write_between_markers(BENCHMARKS, markdown(table, shape, others), BEGIN, END)
        print(f"{len(table)} rows written into {BENCHMARKS} (other Tritons: "
              f"{', '.join(o['triton'] for o in others) or 'none'})")
    disagree = [f"{r['kernel']} sm_{r['arch']}" for r in table if r["picked"] != r["shipped"] and r["picked"]]
    if disagree:
        sys.exit(f"kernel_config does not ship the picked tile of: {', '.join(disagree)} (config.WIDER_TILES)")


if __name__ == "__main__":
    main()
