"""serve export: the stored conversations as WildChat rows; the data loader (what `sdpo-fast train` reads) yields
every interaction the store recorded, with the same x, y and u."""
from __future__ import annotations

import collections
import json
import os
import stat

import pytest

from sdpo_fast.data import load_interactions
from sdpo_fast.serve.export import export
from sdpo_fast.serve.store import Store


def serve(store: Store, user: str, messages: list[dict], reply: str) -> None:
    """Record a turn as the service does: the request's history ending with a reply this server gave `user`, then a
    user message, continues that reply's conversation."""
    previous = None
    if len(messages) >= 2 and messages[-2]["role"] == "assistant" and messages[-1]["role"] == "user":
        previous = store.find_reply(user, messages[:-2], messages[-2]["content"])
    store.record_turn(user, messages, reply, None, None, 0, previous=previous)


def stored_interactions(store: Store, user: str | None = None) -> collections.Counter:
    """(x, y, u) of each interaction in the database, read with SQL independently of export."""
    where, params = ("WHERE i.user = ?", (user,)) if user else ("", ())
    rows = store._connection().execute(
        f"SELECT r.prompt, r.reply, i.followup FROM interactions i JOIN replies r ON r.id = i.reply {where}",
        params).fetchall()
    return collections.Counter((prompt, reply, followup) for prompt, reply, followup in rows)


def loaded_interactions(path) -> collections.Counter:
    stream = load_interactions(path, max_history=1000, strict=True)
    return collections.Counter((json.dumps(i.history, ensure_ascii=False), i.completion, i.followup) for i in stream)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "state")
    store.add_user("alice")
    store.add_user("bob")
    sys = {"role": "system", "content": "Be brief."}
    # alice: a three-turn conversation, one regenerated reply, then a second conversation with control characters
    serve(store, "alice", [sys, u("hi")], "Hello 😊")
    serve(store, "alice", [sys, u("hi"), a("Hello 😊"), u("no emojis")], "Hello.")
    serve(store, "alice", [sys, u("hi"), a("Hello 😊"), u("no emojis")], "Hi.")  # regenerate: same follow-up
    serve(store, "alice", [sys, u("hi"), a("Hello 😊"), u("no emojis"), a("Hi."), u("thanks\x00\n")],
          "You're welcome")
    serve(store, "alice", [u("2+2?")], "4")
    # bob: one follow-up, and a single turn never followed up
    serve(store, "bob", [u("tea?")], "Tea is a drink 🍵")
    serve(store, "bob", [u("tea?"), a("Tea is a drink 🍵"), u("shorter")], "Tea: a drink.")
    serve(store, "bob", [u("coffee?")], "Coffee.")
    return store


def test_loader_yields_exactly_the_stored_interactions(store, tmp_path):
    out = tmp_path / "chats.jsonl"
    rows = export(store.root, out)
    assert rows == 4
    expected = stored_interactions(store)
    assert sum(expected.values()) == 3
    assert loaded_interactions(out) == expected
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_user_filter(store, tmp_path):
    out = tmp_path / "bob.jsonl"
    assert export(store.root, out, user="bob") == 2
    assert loaded_interactions(out) == stored_interactions(store, "bob")
    assert {json.loads(line)["user"] for line in out.read_text().splitlines()} == {"bob"}


def test_branch_keeps_every_interaction(store, tmp_path):
    """An edited follow-up branches the conversation: both branches are written, so the interaction before the
    branch point appears twice and every stored one at least once."""
    sys = {"role": "system", "content": "Be brief."}
    serve(store, "alice", [sys, u("hi"), a("Hello 😊"), u("no emojis"), a("Hi."), u("shorter please")], "Hi")
    out = tmp_path / "chats.jsonl"
    export(store.root, out, user="alice")
    loaded, expected = loaded_interactions(out), stored_interactions(store, "alice")
    assert set(loaded) == set(expected)
    assert loaded - expected == collections.Counter({next(k for k in expected if k[2] == "no emojis"): 1})


def test_errors_name_the_argument_and_leave_the_old_file(store, tmp_path):
    out = tmp_path / "chats.jsonl"
    out.write_text("old\n")
    with pytest.raises(ValueError, match="--user 'carol'"):
        export(store.root, out, user="carol")
    with pytest.raises(ValueError, match="--state-dir"):
        export(tmp_path / "nowhere", out)
    assert out.read_text() == "old\n"
    assert not (tmp_path / "nowhere").exists()


def test_export_command_after_chatting_through_the_api(tmp_path):
    """Conversations held through the real app (a follow-up, a regenerated reply, two users), exported by the
    command: the loader yields the interactions the store recorded, each once."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdpo_fast.cli import main
    from sdpo_fast.demo import single_thread
    from sdpo_fast.serve.app import create_app
    from serving import MODEL, make_service

    with single_thread():
        service = make_service(tmp_path / "state")
        keys = {name: service.store.add_user(name) for name in ("alice", "bob")}
        with TestClient(create_app(service)) as client:
            def chat(user, messages):
                response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys[user]}"},
                                       json={"model": MODEL, "messages": messages, "max_tokens": 6})
                assert response.status_code == 200, response.text
                return messages + [response.json()["choices"][0]["message"]]

            alice = chat("alice", [u("Tell me about coffee.")]) + [u("No emojis, please.")]
            chat("alice", alice)  # regenerated below: same follow-up, one interaction
            alice = chat("alice", alice) + [u("Shorter.")]
            chat("alice", alice)
            chat("bob", chat("bob", [u("Hi")]) + [u("Plain text.")])
    out = tmp_path / "all.jsonl"
    assert main(["serve", "export", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    expected = stored_interactions(Store(tmp_path / "state"))
    assert sum(expected.values()) == 3
    assert loaded_interactions(out) == expected
