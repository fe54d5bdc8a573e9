"""The service's SQLite store: keys stored hashed and matched exactly, private files, turns matched by their exact
prompt and reply per user, interactions learned in order and recorded with the adapter version."""
from __future__ import annotations

import hashlib
import sqlite3
import stat

import pytest

from sdpo_fast.serve.store import KEY_PREFIX, Store, turn_key

X = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tea."}]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_stored_hashed_and_matched_in_full(tmp_path):
    store = Store(tmp_path / "state")
    alice, bob = store.add_user("alice"), store.add_user("bob")
    assert alice.startswith(KEY_PREFIX) and len(alice) == len(KEY_PREFIX) + 43 and alice != bob
    assert (store.authenticate(alice), store.authenticate(bob)) == ("alice", "bob")
    for wrong in ("", alice[:-1], alice + "x", alice.upper(), bob[:-1] + alice[-1]):
        assert store.authenticate(wrong) is None
    stored = dict(sqlite3.connect(store.path).execute("SELECT name, key_hash FROM users"))
    assert stored["alice"] == hashlib.sha256(alice.encode()).digest()
    assert alice.encode() not in store.path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("alice")
    with pytest.raises(ValueError, match="user_id must be"):
        store.add_user("../evil")


def test_state_files_are_owner_only(tmp_path):
    store = Store(tmp_path / "state")
    store.add_user("alice")
    assert _mode(store.root) == 0o700 and _mode(store.adapters_dir) == 0o700
    for path in store.root.glob("serve.db*"):
        assert _mode(path) == 0o600, path


def test_turns_are_matched_per_user_by_exact_prompt_and_reply(tmp_path):
    store = Store(tmp_path / "state")
    for name in ("alice", "bob"):
        store.add_user(name)
    first = store.record_turn("alice", X, "Tea is a drink. 🍵", [5, 6, 2], None, 0, previous=None)
    found = store.find_reply("alice", X, "Tea is a drink. 🍵")
    assert (found.id, found.prompt, found.token_ids, found.logprobs) == (first, X, [5, 6, 2], None)
    assert store.find_reply("bob", X, "Tea is a drink. 🍵") is None  # another user's turn
    assert store.find_reply("alice", X, "Tea is a drink.") is None
    assert store.find_reply("alice", X[1:], "Tea is a drink. 🍵") is None
    assert turn_key(X, "a") != turn_key(X, "b") and turn_key(X[1:], "a") != turn_key(X, "a")

    followup = X + [{"role": "assistant", "content": "Tea is a drink. 🍵"}, {"role": "user", "content": "No emojis."}]
    store.record_turn("alice", followup, "Tea is a drink.", [5, 6, 2], [-0.5, -0.1, -0.2], 0, previous=found)
    store.record_turn("alice", followup, "Tea is a drink.", [5, 6, 2], None, 0, previous=found)  # a retry
    (item,) = store.pending("alice", 10)
    assert (item.prompt, item.reply, item.token_ids, item.followup) == (X, "Tea is a drink. 🍵", [5, 6, 2],
                                                                       "No emojis.")
    assert store.counts("alice") == {"conversations": 1, "replies": 3, "interactions": 1, "learned": 0,
                                     "adapter_version": 0}
    assert store.counts("bob")["interactions"] == 0
    (conversation,) = store.conversations("alice")
    assert conversation["messages"] == followup + [{"role": "assistant", "content": "Tea is a drink."}]
    assert list(store.conversations("bob")) == []


def test_pending_interactions_are_learned_oldest_first_and_versioned(tmp_path):
    store = Store(tmp_path / "state")
    store.add_user("alice")
    ids = []
    for i in range(5):
        prompt = [{"role": "user", "content": f"q{i}"}]
        reply = store.find_reply("alice", prompt, f"a{i}")
        assert reply is None
        store.record_turn("alice", prompt, f"a{i}", [i], None, 0, previous=None)
        previous = store.find_reply("alice", prompt, f"a{i}")
        store.record_turn("alice", prompt + [{"role": "assistant", "content": f"a{i}"},
                                             {"role": "user", "content": f"u{i}"}], "r", [1], None, 0,
                          previous=previous)
        ids.append(store.pending("alice", 10)[-1].id)
    assert store.users_with_pending(5) == ["alice"] and store.users_with_pending(6) == []
    batch = store.pending("alice", 4)
    assert [b.id for b in batch] == ids[:4] and [b.followup for b in batch] == ["u0", "u1", "u2", "u3"]
    store.mark_learned("alice", [b.id for b in batch], 1)
    assert [p.id for p in store.pending("alice", 10)] == ids[4:]
    assert store.counts("alice")["learned"] == 4 and store.adapter_version("alice") == 1
    store.remove_user("alice")
    assert store.users() == [] and store.pending("alice", 10) == [] and store.adapter_version("alice") == 0
