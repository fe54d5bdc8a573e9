"""Online state on disk: user ids matched in full, owner-only state, experiment outputs never overwritten by
accident, persona files that are not text."""
from __future__ import annotations

import stat
import subprocess
import sys

import pytest
import torch

from sdpo_fast.online.adapters import UserAdapters, check_user_id
from sdpo_fast.online.experiments import Phase, run_schedule
from sdpo_fast.online.judge import RuleJudge
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config
from sdpo_fast.online.personas import get_persona, load_personas
from sdpo_fast.online.users import RuleUser
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer


@pytest.mark.parametrize("bad", ["alice\n", "bob\r\n", "carol\x00", "dave\t", "\nerin"])
def test_user_ids_are_matched_in_full(bad):
    with pytest.raises(ValueError, match="user_id"):
        check_user_id(bad)
    assert check_user_id("alice_2-b") == "alice_2-b"


def test_user_state_is_owner_only(tmp_path):
    config = OnlineConfig(update_every=1, max_new_tokens=4, lora_r=4, lora_alpha=8, lr=1e-2)
    adapters = UserAdapters(tiny_causal_lm("qwen3", initializer_range=0.2).train(), tiny_tokenizer("qwen3"),
                            tmp_path / "users", config)
    messages = [{"role": "user", "content": "Hi?"}]
    reply = adapters.respond("alice", messages) or "ok"
    adapters.learn("alice", messages + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": "Shorter."}])
    for path in (tmp_path / "users", tmp_path / "users" / "alice"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def _policy():
    from peft import get_peft_model

    config = OnlineConfig(update_every=2, max_new_tokens=4, lora_r=4, lora_alpha=8, lr=1e-2).validate()
    torch.manual_seed(0)
    return OnlinePolicy(get_peft_model(tiny_causal_lm(initializer_range=0.2), lora_config(config)),
                        tiny_tokenizer(), config)


def test_run_schedule_refuses_existing_results_unless_overwrite(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "online.csv").write_text("earlier results\n")
    options = dict(eval_every=2, eval_prompts=["a?"], oracle=False)
    with pytest.raises(ValueError, match="already holds online.csv; pass overwrite=True"):
        run_schedule(_policy(), [Phase(get_persona("brief"), 2)], RuleUser, RuleJudge(), out, **options)
    assert (out / "online.csv").read_text() == "earlier results\n"
    rows = run_schedule(_policy(), [Phase(get_persona("brief"), 2)], RuleUser, RuleJudge(), out, overwrite=True,
                        **options)
    assert rows and (out / "online.csv").read_text() != "earlier results\n"
    fresh = tmp_path / "fresh"
    run_schedule(_policy(), [Phase(get_persona("brief"), 2)], RuleUser, RuleJudge(), fresh, **options)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def _online(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo_fast.cli", "online", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_an_existing_output_dir_before_loading(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "win_rate_curve.csv").write_text("earlier\n")
    result = _online("curve", "--output-dir", str(out), "--interactions", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "pass --overwrite" in lines[0], result.stderr
    assert (out / "win_rate_curve.csv").read_text() == "earlier\n"


def test_binary_persona_file_names_the_file(tmp_path):
    path = tmp_path / "personas.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError) as err:
        load_personas(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    result = _online("curve", "--personas-file", str(path), "--output-dir", str(tmp_path / "o"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and str(path) in lines[0], result.stderr
