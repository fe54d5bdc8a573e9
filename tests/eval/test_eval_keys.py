"""The results directory reuses a benchmark only when everything that produced it matches (checkpoint and base
files, settings, task folder, versions); the table shows the counts behind each figure and a Wilson interval;
bad task names and an adapter that does not fit its base are refused before any model loads."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.eval import EvalModels, evaluate_checkpoint, markdown_table
from sdpo_fast.eval import run as eval_run
from sdpo_fast.eval.results import wilson_interval
from sdpo_fast.online.judge import RuleJudge
from sdpo_fast.online.personas import get_persona
from sdpo_fast.train.setup import load_model

PROMPTS = ["Any advice on staying focused?", "Tell me about jazz."]
OPTIONS = dict(prompts=PROMPTS, judge=RuleJudge(), persona=get_persona("brief"), max_new_tokens=4, device="cpu")


def _no_model_loads(monkeypatch):
    monkeypatch.setattr(EvalModels, "get", lambda self, side: pytest.fail(f"the {side} model was loaded"))


def test_results_of_another_checkpoint_are_refused_not_shown(tiny_checkpoint, tmp_path, monkeypatch):
    other = tmp_path / "run-b" / "checkpoint-1"
    shutil.copytree(tiny_checkpoint.parent, tmp_path / "run-b")
    out = tmp_path / "out"
    first = evaluate_checkpoint(tiny_checkpoint, out, **OPTIONS)
    stored = json.loads((out / "pairwise.json").read_text())
    assert stored["key"]["checkpoint"]["path"] == str(tiny_checkpoint.resolve())
    assert set(stored["key"]["versions"]) >= {"sdpo_fast", "torch", "transformers"}

    assert set(stored["key"]["checkpoint"]["files"]) == {"config.json", "generation_config.json", "model.safetensors",
                                                         "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    _no_model_loads(monkeypatch)
    assert evaluate_checkpoint(tiny_checkpoint, out, **OPTIONS) == first  # exact match: reused
    with pytest.raises(ValueError, match=r"computed by another run.*key\.checkpoint\.path"):
        evaluate_checkpoint(other, out, **OPTIONS)
    weights = tiny_checkpoint / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place (a new save)
    with pytest.raises(ValueError, match=r"key\.checkpoint\.files\.model\.safetensors"):
        evaluate_checkpoint(tiny_checkpoint, out, **OPTIONS)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match=r"settings\.persona\.name: 'brief' there, 'no-emojis' now"):
        evaluate_checkpoint(tiny_checkpoint, out, **dict(OPTIONS, persona=get_persona("no-emojis")))
    with pytest.raises(ValueError, match=r"key\.dtype"):
        evaluate_checkpoint(tiny_checkpoint, out, **dict(OPTIONS, dtype="bfloat16"))


def test_results_written_into_the_checkpoint_directory_do_not_change_its_key(tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    shutil.copytree(tiny_checkpoint.parent, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    first = evaluate_checkpoint(checkpoint, checkpoint, **OPTIONS)
    assert (checkpoint / "pairwise.json").is_file()
    _no_model_loads(monkeypatch)
    assert evaluate_checkpoint(checkpoint, checkpoint, **OPTIONS) == first


def test_a_base_side_left_by_a_failed_run_with_another_base_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_path(), other_base)
    model = load_model(str(other_base), dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(other_base)
    out = tmp_path / "out"
    real = eval_run._replies
    calls = []

    def fail_on_the_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the checkpoint failed to load")
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_run, "_replies", fail_on_the_checkpoint)
    with pytest.raises(RuntimeError):
        evaluate_checkpoint(tiny_checkpoint, out, base=str(other_base), **OPTIONS)
    assert list(json.loads((out / "pairwise.json").read_text())["replies"]) == ["base"]
    _no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"key\.base\.path: '.*other-base' there, '.*tiny_model' now"):
        evaluate_checkpoint(tiny_checkpoint, out, **OPTIONS)


def test_table_shows_decided_pairs_ties_and_a_wilson_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    record = {"benchmark": "pairwise", "kind": "pairwise", "base": {"win_rate": 0.5},
              "sdpo": {"win_rate": 1.0, "lc_win_rate": 0.997, "se": 0.0, "wins": 2, "losses": 0, "ties": 30}}
    mc = {"benchmark": "mc_local", "kind": "lm_eval",
          "base": {"metrics": {"acc,none": 1 / 3, "acc_stderr,none": 0.21}, "primary": "acc,none", "n": 6},
          "sdpo": {"metrics": {"acc,none": 0.5, "acc_stderr,none": 0.22}, "primary": "acc,none", "n": 6}}
    table = markdown_table([mc, record])
    ci = scipy_stats.binomtest(2, 2).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(2, 2) == pytest.approx((ci.low, ci.high), abs=1e-12)
    lines = table.splitlines()
    assert lines[0] == ("| model | mc_local (acc, n=6) | win rate vs base (LC; 2 won, 0 lost, 30 tied of 32) |")
    mc_ci = scipy_stats.binomtest(3, 6).proportion_ci(method="wilson")
    mc_cell = f"50.0 [{100 * mc_ci.low:.1f}, {100 * mc_ci.high:.1f}]"
    assert lines[3] == f"| SDPO | {mc_cell} | 99.7 [{100 * ci.low:.1f}, 100.0] |"
    assert "± 0.0" not in table and "Wilson" in table
    mc["sdpo"]["metrics"]["acc,none"] = 0.55  # not a share of 6 documents: lm-eval's standard error
    assert "| SDPO | 55.0 ± 22.0 |" in markdown_table([mc])
    ci = scipy_stats.binomtest(7, 10).proportion_ci(method="wilson")
    assert wilson_interval(7, 10) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson_interval(0, 0) is None


def test_unknown_task_is_refused_before_any_model_loads(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    _no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_checkpoint(tiny_checkpoint, tmp_path / "out", tasks=["no_such_task"], device="cpu")
    assert not (tmp_path / "out").exists()


def test_adapter_on_a_base_of_another_size_is_refused_before_any_model_loads(tmp_path, monkeypatch, model_dir):
    peft = pytest.importorskip("peft")
    base = load_model(str(tiny_model_path()), dtype=torch.float32, device=torch.device("cpu"))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    eval_run.check_adapter_base(tmp_path / "adapter", str(tiny_model_path()))  # its own base fits
    _no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"q_proj has in_features 128, but the base model .* has 64"):
        evaluate_checkpoint(tmp_path / "adapter", tmp_path / "out", base=model_dir, **OPTIONS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--limit", "nan"], "--limit must be a finite number > 0, got nan"),
    (["--limit", "inf"], "--limit must be a finite number > 0, got inf"),
    (["--limit", "0"], "--limit must be a finite number > 0, got 0.0"),
    (["--limit", "2.5"], "--limit must be a fraction < 1 or a whole number of documents, got 2.5"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--timeout", "inf"], "--timeout must be a finite number > 0, got inf"),
    (["--n-prompts", "0"], "--n-prompts must be an integer >= 1, got 0"),
])
def test_eval_number_flags_are_checked_before_anything_loads(flags, message, tiny_checkpoint, tmp_path, capsys,
                                                             monkeypatch):
    from sdpo_fast.cli import main

    _no_model_loads(monkeypatch)
    out = tmp_path / "out"
    assert main(["eval", str(tiny_checkpoint), "--out", str(out), "--prompts", "demo", "--persona", "brief",
                 *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_an_unreachable_hub_base_is_refused_at_once(tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub.utils import _http

    from sdpo_fast.train import setup

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(setup, "hub_unreachable", lambda: "gaierror")
    monkeypatch.setattr(_http.time, "sleep", lambda s: pytest.fail("the Hub request was retried"))
    with pytest.raises(FileNotFoundError, match="--base 'org/no-such-model'.*cannot be reached"):
        evaluate_checkpoint(tiny_checkpoint, tmp_path / "out", base="org/no-such-model", **OPTIONS)
    assert not (tmp_path / "out").exists()
