"""`sdpo-fast train`'s closing report in every distillation mode, and refusals that come before anything is
written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdpo_fast import cli


@pytest.mark.parametrize("mode", ["full_logits", "topk_logits", "sampled_token"])
def test_report_in_every_mode(tmp_path, capsys, model_dir, data_path, mode):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--distillation-mode", mode, "--distillation-topk", "5",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    key = "mean_advantage" if mode == "sampled_token" else "mean_divergence"
    first, last = steps[0], steps[-1]
    assert (f"loss {first['loss']:.4f} -> {last['loss']:.4f}; {key.replace('_', ' ')} "
            f"{first[key]:+.4f} -> {last[key]:+.4f}") in printed
    checkpoint = printed.split("checkpoint: ")[1].split(";")[0]
    assert Path(checkpoint) == out / "checkpoint-2" and Path(checkpoint).is_dir()


def test_top1_without_tail_is_refused_before_the_output_dir_is_made(tmp_path, capsys, model_dir, data_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out),
                     "--distillation-mode", "topk_logits", "--distillation-topk", "1",
                     "--no-distillation-add-tail", "--no-progress"]) == 2
    assert "trains nothing" in capsys.readouterr().err and not out.exists()
