"""Training throughput of one process against a torchrun job of N (FSDP2), same flags and global batch.

Run: pytest benchmarks/test_distributed_bench.py --benchmark-only
- CPU (anywhere): the bundled tiny model, gloo, one thread per process (a functional scaling check: the tiny
  model's steps are small enough that FSDP2's per-layer all-gathers weigh as much as the compute).
- CUDA: as many processes as visible GPUs (NCCL), when there are at least two.
tokens/s is the trainer's own (metrics.jsonl: tokens run over step seconds, process start and loading excluded);
the benchmark's time is the whole command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count()
PROCESSES = [1, 2] if GPUS < 2 else [1, GPUS]
FLAGS = ["--max-steps", "12", "--batch-size", "32", "--save-steps", "0", "--save-minutes", "none", "--no-progress"]


def run_train(nproc: int, output_dir: Path) -> float:
    """Run `sdpo-fast train` (under torchrun when nproc > 1); tokens/s over the run's steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "sdpo_fast.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
         "sdpo_fast.cli"]
    done = subprocess.run([*cli, "train", "--output-dir", str(output_dir), *FLAGS], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()
             if '"tokens_per_s"' in line]
    return sum(s["tokens"] for s in steps) / sum(s["seconds"] for s in steps)


@pytest.mark.parametrize("nproc", PROCESSES)
def test_train_tokens_per_second(benchmark, tmp_path, nproc):
    runs = iter(range(100))
    result = {}

    def once():
        result["tokens_per_s"] = run_train(nproc, tmp_path / f"run{next(runs)}")

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(processes=nproc, device="cuda" if GPUS >= 2 else "cpu", **result)
