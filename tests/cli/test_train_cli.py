"""Config resolution, checkpoints and exact resume, and `sdpo-fast train` end to end (bad inputs included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_fast import cli
from sdpo_fast.train import PRESETS, TrainConfig, latest_checkpoint, load_yaml, resolve_config, train

# --- config -------------------------------------------------------------------------------------------------


def test_flags_win_over_file_over_preset_over_defaults():
    file_values = {"preset": "paper-offline", "lr": "3e-6", "batch_size": 8, "lora_target_modules": "q_proj, v_proj"}
    config = resolve_config(file_values, {"batch_size": 4, "optimizer": "adamw"})
    assert config.batch_size == 4 and config.lr == 3e-6 and config.optimizer == "adamw"
    assert config.gradient_checkpointing is True and config.data_preset == "paper"
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert resolve_config().optimizer == "adamw" and PRESETS["paper-offline"]["optimizer"] == "adamw8bit"


@pytest.mark.parametrize("values,message", [
    ({"learning_rate": 1e-5}, "unknown config file key(s) ['learning_rate']; valid keys: model, data"),
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"aggregation": "mean"}, "aggregation must be one of ['sequence', 'token']"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in [0, 1.0)"),
    ({"shuffle": "yes"}, "shuffle must be true or false"),
    ({"preset": "paper"}, "preset must be one of ['paper-offline', 'tiny-demo']"),
    ({"loss": "sft", "signal_clip": 2.0}, "signal_clip applies to loss 'sdpo' only"),
])
def test_bad_config_values_name_the_key(values, message):
    with pytest.raises(ValueError) as err:
        resolve_config(values)
    assert message in str(err.value)


# --- training runs on a saved tiny model ----------------------------------------------------------------------


def _config(model_dir, data_path, out, **options) -> TrainConfig:
    base = dict(model=model_dir, data=data_path, output_dir=str(out), batch_size=2, epochs=2, lr=1e-3,
                micro_batch_tokens=256, save_steps=2, seed=7)
    return TrainConfig(**{**base, **options})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir, data_path) -> dict:
    """Summary of a full-fine-tuning run of 6 steps that nothing interrupted."""
    return train(_config(model_dir, data_path, tmp_path_factory.mktemp("whole") / "run"), progress=False)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _step(checkpoint: Path | None) -> int:
    return -1 if checkpoint is None else int(checkpoint.name.split("-")[1])


def _metric_lines(out: Path) -> list[dict]:
    """The per-step lines of metrics.jsonl (not the "start" events)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "event" not in line]


def _losses(out: Path) -> list[float]:
    return [line["loss"] for line in _metric_lines(out)]


def test_stop_and_resume_equals_uninterrupted_lora_with_dropout(tmp_path, model_dir, data_path):
    """LoRA adapters with dropout: the resumed run restores the RNG stream, the optimizer and the schedule."""
    options = dict(lora_r=4, lora_dropout=0.2, optimizer="sgd", lr=0.1)
    whole = train(_config(model_dir, data_path, tmp_path / "whole", **options), progress=False)
    assert whole["steps"] == whole["total_steps"] == 6
    stopped = train(_config(model_dir, data_path, tmp_path / "split", **options), progress=False, stop_after=3)
    assert stopped["steps"] == 3 and Path(stopped["checkpoint"]).name == "checkpoint-2"
    resumed = train(_config(model_dir, data_path, tmp_path / "split", resume=True, **options), progress=False)
    assert resumed["steps"] == 6
    _assert_bitwise_equal(Path(whole["checkpoint"]), Path(resumed["checkpoint"]))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    assert set(os.listdir(whole["checkpoint"])) >= {"adapter_model.safetensors", "adapter_config.json",
                                                     "tokenizer.json", "trainer_state.pt"}
    assert "model.safetensors" not in os.listdir(whole["checkpoint"])


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, model_dir, data_path, uninterrupted):
    flags = ["--model", model_dir, "--data", data_path, "--batch-size", "2", "--epochs", "2", "--lr", "1e-3",
             "--micro-batch-tokens", "256", "--save-steps", "1", "--seed", "7", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sdpo_fast.cli", "train", "--output-dir", str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _step(latest_checkpoint(out)) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= _step(latest_checkpoint(out)) < 6
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--no-progress"]) == 0  # the saved config
    _assert_bitwise_equal(Path(uninterrupted["checkpoint"]), latest_checkpoint(out))
    assert _losses(Path(uninterrupted["output_dir"])) == _losses(out)
    start = _weights(Path(model_dir))["lm_head.weight"]
    assert not torch.equal(start, _weights(Path(uninterrupted["checkpoint"]))["lm_head.weight"])
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_sft_mode_lowers_the_nll(tmp_path, model_dir, data_path):
    summary = train(_config(model_dir, data_path, tmp_path, loss="sft", epochs=3, lr=3e-3, save_steps=0,
                            shuffle=False, warmup_ratio=0.0, schedule="constant"), progress=False)
    lines = _metric_lines(tmp_path)
    assert len(lines) == summary["total_steps"] == 9
    assert lines[-1]["mean_nll"] < lines[2]["mean_nll"] and lines[0]["positive_advantage_share"] is None
    assert lines[-1]["mean_nll"] < lines[5]["mean_nll"]


# --- the command ------------------------------------------------------------------------------------------------


def test_yaml_config_and_flags(tmp_path, model_dir, data_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data_path}\nbatch_size: 100\nmax_steps: 1\nloss: sft\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--output-dir", str(out), "--batch-size", "3",
                     "--no-progress"]) == 0
    saved = load_yaml(out / "config.yaml")
    assert saved["batch_size"] == 3 and saved["max_steps"] == 1 and saved["loss"] == "sft"


def _bad_rows(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversation": [{"role": "user", "content": "only one message"}]}) + "\n")
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing-model", "no such local directory"),
    ("zero-interactions", "zero usable interactions"),
    ("bad-value", "lr must be a finite number > 0"),
    ("unknown-yaml-key", "valid keys:"),
    ("lora-without-peft", "needs peft"),
    ("adamw8bit-without-bitsandbytes", "needs bitsandbytes"),
    ("resume-without-checkpoint", "no checkpoint"),
])
def test_bad_input_fails_cleanly(tmp_path, monkeypatch, capsys, case, message):
    out = tmp_path / "out"
    args = ["train", "--output-dir", str(out), "--no-progress"]
    extra = {
        "missing-model": ["--model", str(tmp_path / "no-such-model")],
        "zero-interactions": ["--data", _bad_rows(tmp_path)],
        "bad-value": ["--lr", "-1"],
        "unknown-yaml-key": ["--config", str(tmp_path / "c.yaml")],
        "lora-without-peft": ["--lora-r", "8"],
        "adamw8bit-without-bitsandbytes": ["--optimizer", "adamw8bit"],
        "resume-without-checkpoint": ["--resume"],
    }[case]
    (tmp_path / "c.yaml").write_text("epochs: 1\nwarmup_steps: 10\n")
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert cli.main(args + extra) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["train", "--output-dir", str(out), "--no-progress", "--max-steps", "1"]) != 0
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
