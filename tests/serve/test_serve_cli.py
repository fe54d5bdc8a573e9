"""`sdpo-fast serve` user commands, and `serve run`'s refusals before any weights load."""
from __future__ import annotations

import pytest

from sdpo_fast.cli import main
from sdpo_fast.serve.store import Store


def test_add_list_remove_users(tmp_path, capsys):
    state = str(tmp_path / "state")
    assert main(["serve", "add-user", "alice", "--state-dir", state]) == 0
    key = capsys.readouterr().out
    assert key.count("\n") == 1 and Store(state).authenticate(key.strip()) == "alice"
    assert main(["serve", "add-user", "bob", "--state-dir", state]) == 0
    bob = capsys.readouterr().out.strip()
    assert main(["serve", "list-users", "--state-dir", state]) == 0
    listing = capsys.readouterr().out
    assert [line.split("\t")[0] for line in listing.splitlines()] == ["user", "alice", "bob"]
    assert key.strip() not in listing and bob not in listing
    assert main(["serve", "remove-user", "alice", "--state-dir", state]) == 0
    capsys.readouterr()
    assert Store(state).users() == ["bob"] and Store(state).authenticate(key.strip()) is None
    assert main(["serve", "remove-user", "alice", "--state-dir", state]) == 2
    assert "no user named 'alice'" in capsys.readouterr().err
    assert main(["serve", "add-user", "bob", "--state-dir", state]) == 2
    assert "already exists" in capsys.readouterr().err


def test_list_users_without_state_is_one_clear_error(tmp_path, capsys):
    assert main(["serve", "list-users", "--state-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add-user" in err and not (tmp_path / "none").exists()


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--rate-limit", "-1"], "--rate-limit must be >= 0"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--update-every", "0"], "update_every must be an integer >= 1"),
])
def test_run_refuses_bad_flags_before_loading(tmp_path, capsys, argv, message):
    assert main(["serve", "run", "--state-dir", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_run_without_fastapi_names_the_extra(tmp_path, capsys, monkeypatch):
    import sdpo_fast.cli.serve as serve

    monkeypatch.setattr(serve, "importable", lambda name: name not in ("fastapi", "uvicorn"))
    assert main(["serve", "run", "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'sdpo_fast[serve]'" in err
