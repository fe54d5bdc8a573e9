"""`sdpo-fast train` as a user runs it (subprocesses): kill -9 at step 0 and SIGINT/SIGTERM followed by --resume
(bitwise equal to an uninterrupted run), and bad inputs that must end in one line before any weights load."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import copy_model
import torch
from safetensors.torch import load_file

from sdpo_fast.train import TrainConfig, train
from sdpo_fast.train.checkpoint import checkpoint_dirs

_FLAGS = ["--batch-size", "2", "--lr", "1e-3", "--micro-batch-tokens", "256", "--seed", "7", "--no-progress"]


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdpo_fast.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo_fast.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _error_line(stderr: str) -> str:
    """The command's own last stderr line (progress bars of transformers aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("sdpo-fast")]
    assert lines, stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "event" not in line]


def _wait(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir, data_path) -> Path:
    """Output dir of a 10-step run (the CLI defaults otherwise) that nothing interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(TrainConfig(model=model_dir, data=data_path, output_dir=str(out), batch_size=2, lr=1e-3,
                      micro_batch_tokens=256, seed=7, max_steps=10), progress=False, log=lambda m: None)
    return out


@pytest.mark.slow
def test_kill_9_at_step_0_with_default_options_then_resume(tmp_path, model_dir, data_path, uninterrupted):
    out = tmp_path / "run"
    proc = _cli("train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "10",
                *_FLAGS)
    _wait(lambda: (out / "config.yaml").is_file(), proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not checkpoint_dirs(out)
    resumed = _run("train", "--output-dir", str(out), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint in" in resumed.stderr and "starting from step 0" in resumed.stderr
    assert "data: 5 rows read" in resumed.stdout
    _assert_bitwise_equal(uninterrupted / "checkpoint-10", out / "checkpoint-10")
    assert _losses(uninterrupted) == _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_then_resume_is_bitwise_equal(tmp_path, model_dir, data_path, uninterrupted,
                                                                signum, code):
    out = tmp_path / "run"
    proc = _cli("train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "10",
                *_FLAGS)
    metrics = out / "metrics.jsonl"
    _wait(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    line = _error_line(stderr)
    name = signal.Signals(signum).name
    assert line.startswith(f"sdpo-fast train: interrupted by {name} at step ") and "--resume" in line
    step = int(line.split(" at step ")[1].split("/")[0])
    assert 1 <= step < 10 and [p.name for p in checkpoint_dirs(out)] == [f"checkpoint-{step}"]
    resumed = _run("train", "--output-dir", str(out), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    _assert_bitwise_equal(uninterrupted / "checkpoint-10", out / "checkpoint-10")
    assert _losses(uninterrupted) == _losses(out)


@pytest.mark.slow
def test_resume_with_a_changed_fixed_option_is_refused_in_one_line(tmp_path, model_dir, data_path):
    out = tmp_path / "run"
    assert _run("train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "1",
                *_FLAGS).returncode == 0
    refused = _run("train", "--output-dir", str(out), "--resume", "--seed", "1", "--loss", "sft", "--no-progress")
    line = _error_line(refused.stderr)
    assert refused.returncode == 2 and "cannot change" in line
    assert "seed: 7 in the run, 1 now" in line and "loss: 'sdpo' in the run, 'sft' now" in line


@pytest.mark.parametrize("case,message", [
    ("mistyped-relative-model", "--model 'modls/tiny': no such local directory"),
    ("model-without-tokenizer", "has no tokenizer files"),
    ("pickle-weights", "pickle weights are not loaded"),
    ("output-dir-is-a-file", "output_dir"),
    ("output-dir-under-a-file", "is under the file"),
    ("triton-on-cpu", "loss_backend 'triton' cannot run on cpu"),
])
def test_bad_input_is_one_line_before_weights_load(tmp_path, model_dir, data_path, case, message):
    out = tmp_path / "out"
    model = model_dir
    extra, env = [], {"HF_HUB_OFFLINE": "0"}
    if case == "mistyped-relative-model":
        model = "modls/tiny"
    elif case == "model-without-tokenizer":
        model = copy_model(model_dir, tmp_path / "m", drop=["tokenizer.json", "tokenizer_config.json"])
    elif case == "pickle-weights":
        model = copy_model(model_dir, tmp_path / "m", drop=["model.safetensors"], add={"pytorch_model.bin": "x"})
    elif case == "output-dir-is-a-file":
        out.write_text("x")
    elif case == "output-dir-under-a-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    elif case == "triton-on-cpu":
        if torch.cuda.is_available():
            pytest.skip("triton runs on this machine's GPU")
        extra, env = ["--loss-backend", "triton"], {"TRITON_INTERPRET": "0"}
    result = _run("train", "--model", model, "--data", data_path, "--output-dir", str(out), *extra, *_FLAGS,
                  env=env)
    line = _error_line(result.stderr)
    assert result.returncode == 2 and message in line, result.stderr
    assert "Loading weights" not in result.stderr
    assert not (tmp_path / "out").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (see the in-process test)")
def test_read_only_output_dir_is_one_line(tmp_path, model_dir, data_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = _run("train", "--model", model_dir, "--data", data_path, "--output-dir", str(parent / "run"),
                      *_FLAGS)
    finally:
        parent.chmod(0o700)
    assert result.returncode == 2 and "cannot write" in _error_line(result.stderr)
