"""A torchrun run resumed with another number of processes records the change (metrics.jsonl's start event,
config_history.jsonl, the summary), as the README says changes are recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend")]

FLAGS = ["--batch-size", "4", "--micro-batch-tokens", "200", "--save-steps", "1", "--optimizer", "sgd", "--lr", "0.05",
         "--no-progress"]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "sdpo_fast.cli", "train", *args, *FLAGS],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_resume_on_another_world_size_records_it(tmp_path):
    out = tmp_path / "run"
    _torchrun(2, ["--output-dir", str(out), "--max-steps", "1"])
    done = _torchrun(3, ["--output-dir", str(out), "--resume", "--max-steps", "2"])
    starts = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e.get("event") == "start"]
    assert [s["changed"] for s in starts] == [{}, {"world_size": [2, 3], "max_steps": [1, 2]}]
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"world_size": [2, 3], "max_steps": [1, 2]}
    assert "world_size 2 -> 3" in done.stderr + done.stdout
