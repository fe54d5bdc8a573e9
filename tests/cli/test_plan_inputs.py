"""`sdpo-fast plan` refuses what it cannot plan, at once and naming it: a non-finite budget, a world size beyond
its bound, a config.json whose shape fields are missing or not positive integers, and an unknown model name
while the Hub is unreachable (no retries)."""
from __future__ import annotations

import json
import time

import pytest

from sdpo_fast.cli import main
from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.train import TrainConfig
from sdpo_fast.train.plan import load_config, simulate


@pytest.mark.parametrize("flags,message", [
    (["--budget-gib", "inf"], "--budget-gib must be a finite number > 0, got inf"),
    (["--budget-gib", "nan"], "--budget-gib must be a finite number > 0, got nan"),
    (["--world-size", "4096"], "--world-size must be in [1, 1024], got 4096"),
    (["--world-size", "0"], "--world-size must be in [1, 1024], got 0"),
])
def test_bad_plan_flags_are_refused_at_once(flags, message, capsys):
    start = time.perf_counter()
    assert main(["plan", *flags]) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match=r"world_size must be an integer in \[1, 1024\]"):
        simulate(TrainConfig(), load_config(str(tiny_model_path())), world_size=4096)


def _config_file(tmp_path, change: dict, drop: str | None = None):
    values = json.loads((tiny_model_path() / "config.json").read_text())
    values.update(change)
    values.pop(drop, None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("change,drop,message", [
    ({"hidden_size": -4}, None, "config.json's hidden_size must be a positive integer, got -4"),
    ({"vocab_size": "1000"}, None, "config.json's vocab_size must be a positive integer, got '1000'"),
    ({"num_key_value_heads": 0}, None, "config.json's num_key_value_heads must be a positive integer, got 0"),
    ({}, "num_hidden_layers", "config.json has no num_hidden_layers"),
    ({}, "hidden_size", "config.json has no hidden_size"),
    ({}, "vocab_size", "config.json has no vocab_size"),
])
def test_config_json_shape_fields_are_checked(tmp_path, capsys, change, drop, message):
    from transformers import AutoConfig, Qwen3Config

    path = _config_file(tmp_path, change, drop)
    if drop in ("hidden_size", "vocab_size"):  # why: transformers fills in Qwen3's own size, silently
        assert getattr(AutoConfig.from_pretrained(path), drop) == getattr(Qwen3Config(), drop)
    with pytest.raises(ValueError, match=message):
        load_config(path)
    assert main(["plan", "--model", path]) == 2
    assert message in capsys.readouterr().err
    load_config(_config_file(tmp_path, {}))  # the unchanged file plans


def test_config_json_that_is_no_object_or_missing(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        load_config(str(tmp_path / "config.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory without a config.json"):
        load_config(str(tmp_path / "empty"))


def test_unknown_name_fails_fast_without_retrying_the_hub(monkeypatch):
    from huggingface_hub.utils import _http

    from sdpo_fast.train import setup

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(setup, "hub_unreachable", lambda: "gaierror")
    monkeypatch.setattr(_http.time, "sleep", lambda s: pytest.fail("the Hub request was retried"))
    with pytest.raises(ValueError, match="no-such-model.*known shapes.*cannot be reached"):
        load_config("no-such-model")


def test_importance_clip_plans_with_the_samplers_logprobs():
    plan = simulate(TrainConfig(importance_clip=2.0, max_prompt_tokens=64, max_completion_tokens=32),
                    load_config(str(tiny_model_path())))
    assert plan.peak_bytes > 0
