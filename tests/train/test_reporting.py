"""report_to sinks, QLoRA and Liger options of the trainer: what runs here, and clear errors for the rest."""
import json
import sys

import pytest
import torch

from sdpo_fast import cli
from sdpo_fast.data import sample_path
from sdpo_fast.train import TrainConfig, resolve_config, train


def test_tensorboard_gets_the_same_metrics_as_the_jsonl(tmp_path, model_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(model=model_dir, data=str(sample_path()), output_dir=str(tmp_path / "run"), batch_size=4,
                         max_steps=3, lr=1e-3, micro_batch_tokens=512, report_to=["tensorboard"]).validate()
    train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "event" not in m]  # step lines; a run's start is an event line
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for name in ("loss", "mean_advantage", "grad_norm", "lr"):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [m["step"] for m in logged]
        assert [s.value for s in scalars] == pytest.approx([m[name] for m in logged], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize("extra,message", [
    (["--report-to", "wandb"], "report_to 'wandb' needs the wandb package"),
    (["--lora-r", "8", "--load-in-4bit"], "load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes"),
    (["--use-liger"], "use_liger needs a CUDA GPU and liger-kernel"),
    (["--load-in-4bit"], "load_in_4bit (QLoRA) trains adapters only: set lora_r > 0"),
    (["--report-to", "mlflow"], "report_to must be a list among ['tensorboard', 'wandb']"),
])
def test_unavailable_options_fail_cleanly(tmp_path, monkeypatch, capsys, model_dir, extra, message):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "out"
    assert cli.main(["train", "--model", model_dir, "--output-dir", str(out), "--no-progress", *extra]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_report_to_accepts_a_comma_separated_string():
    assert resolve_config({"report_to": "tensorboard"}).report_to == ["tensorboard"]
