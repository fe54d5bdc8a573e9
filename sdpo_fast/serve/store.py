"""The service's state in one SQLite database (`DIR/serve.db`, WAL, one transaction per change): users with
hashed API keys, conversations and the replies served in them, interactions (x, y, u) with their learned state,
and each user's adapter versions. The adapters themselves live in `DIR/adapters/<user>/` (online/adapters.py).

Keys: `sk-sdpo-` + 43 random URL-safe characters (256 bits); only their SHA-256 is stored, and a presented key is
compared with every stored hash in constant time (`hmac.compare_digest`). Files are owner-only (0600, dirs 0700).

A served reply is stored with its prompt (the messages before it, ending with a user message) and its sampled
token ids. A turn is identified by `turn_key(prompt, reply)`, so a stateless client resending the history is
matched to the replies this server gave that user.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..online.adapters import check_user_id

DB_FILE = "serve.db"
ADAPTERS_DIR = "adapters"
KEY_PREFIX = "sk-sdpo-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, key_hash BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user TEXT NOT NULL, turn_key TEXT NOT NULL, prompt TEXT NOT NULL, reply TEXT NOT NULL, token_ids TEXT,
    logprobs TEXT, adapter_version INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS replies_by_turn ON replies(user, turn_key);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, reply INTEGER NOT NULL REFERENCES replies(id) ON DELETE CASCADE,
    followup TEXT NOT NULL, learned_version INTEGER, created REAL NOT NULL, UNIQUE(reply, followup));
CREATE INDEX IF NOT EXISTS interactions_pending ON interactions(user, learned_version, id);
CREATE TABLE IF NOT EXISTS adapter_versions (
    user TEXT NOT NULL, version INTEGER NOT NULL, interactions INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(user, version));
"""


def turn_key(prompt: list[dict], reply: str) -> str:
    """SHA-256 (hex) of a turn: the prompt's (role, content) pairs and the reply."""
    canonical = json.dumps([[m["role"], m["content"]] for m in prompt] + [reply], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class StoredReply:
    """A reply this server gave: its id, conversation, prompt messages, text and sampled ids (None: unknown)."""

    id: int
    conversation: int
    prompt: list[dict]
    reply: str
    token_ids: list[int] | None
    logprobs: list[float] | None


@dataclass(frozen=True)
class PendingItem:
    """An interaction not yet learned: x (the prompt of the reply), y (the reply, with its ids), u."""

    id: int
    prompt: list[dict]
    reply: str
    token_ids: list[int] | None
    logprobs: list[float] | None
    followup: str


class Store:
    """The state directory `root`: its SQLite database and adapter directory (created owner-only).

    Safe to share between threads: each thread gets its own connection; writes are single transactions.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.adapters_dir = self.root / ADAPTERS_DIR
        self.adapters_dir.mkdir(mode=0o700, exist_ok=True)
        self.path = self.root / DB_FILE
        self._local = threading.local()
        old = os.umask(0o077)
        try:
            self._connection().executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        finally:
            os.umask(old)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT; rolled back on an exception)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # users

    def add_user(self, name: str) -> str:
        """Create user `name`; returns its new API key (shown once: only its hash is stored)."""
        check_user_id(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"user {name!r} already exists; remove-user it first or choose another name")
            db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, _key_hash(key), time.time()))
        return key

    def remove_user(self, name: str) -> None:
        """Delete user `name`, their conversations, interactions and adapter versions (the adapter directory is
        the caller's to remove)."""
        with self.transaction() as db:
            if not db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount:
                raise ValueError(f"no user named {name!r}")
            for table in ("interactions", "replies", "conversations", "adapter_versions"):
                db.execute(f"DELETE FROM {table} WHERE user = ?", (name,))

    def authenticate(self, key: str) -> str | None:
        """The user whose key is `key`, else None; the hash is compared with every user's in constant time."""
        digest = _key_hash(key)
        found = None
        for name, stored in self._connection().execute("SELECT name, key_hash FROM users").fetchall():
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found

    def users(self) -> list[str]:
        return [n for (n,) in self._connection().execute("SELECT name FROM users ORDER BY name")]

    def counts(self, user: str) -> dict:
        """{"conversations", "replies", "interactions", "learned", "adapter_version"} of `user`."""
        db = self._connection()

        def one(sql: str) -> int:
            return db.execute(sql, (user,)).fetchone()[0]

        return {"conversations": one("SELECT COUNT(*) FROM conversations WHERE user = ?"),
                "replies": one("SELECT COUNT(*) FROM replies WHERE user = ?"),
                "interactions": one("SELECT COUNT(*) FROM interactions WHERE user = ?"),
                "learned": one("SELECT COUNT(*) FROM interactions WHERE user = ? AND learned_version IS NOT NULL"),
                "adapter_version": self.adapter_version(user)}

    # turns

    def find_reply(self, user: str, prompt: list[dict], reply: str) -> StoredReply | None:
        """The reply `reply` this server gave `user` after exactly `prompt`, else None."""
        row = self._connection().execute(
            "SELECT id, conversation, prompt, reply, token_ids, logprobs FROM replies WHERE user = ? AND turn_key = ? "
            "ORDER BY id LIMIT 1", (user, turn_key(prompt, reply))).fetchone()
        if row is None:
            return None
        stored = StoredReply(row[0], row[1], json.loads(row[2]), row[3], _loads(row[4]), _loads(row[5]))
        return stored if stored.prompt == [_plain(m) for m in prompt] and stored.reply == reply else None

    def reply_count(self, user: str) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM replies WHERE user = ?", (user,)).fetchone()[0]

    def record_turn(self, user: str, prompt: list[dict], reply: str, token_ids: list[int] | None,
                    logprobs: list[float] | None, adapter_version: int, *, previous: StoredReply | None) -> int:
        """Commit one served turn: the reply to `prompt` and, when `previous` is the reply the prompt's last
        message follows up, the interaction (previous.prompt, previous.reply, prompt[-1]). Returns the reply's id."""
        now = time.time()
        prompt = [_plain(m) for m in prompt]
        with self.transaction() as db:
            if previous is None:
                conversation = db.execute("INSERT INTO conversations (user, created) VALUES (?, ?)",
                                          (user, now)).lastrowid
            else:
                conversation = previous.conversation
                db.execute("INSERT OR IGNORE INTO interactions (user, reply, followup, created) VALUES (?, ?, ?, ?)",
                           (user, previous.id, prompt[-1]["content"], now))
            return db.execute(
                "INSERT INTO replies (conversation, user, turn_key, prompt, reply, token_ids, logprobs, "
                "adapter_version, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation, user, turn_key(prompt, reply), json.dumps(prompt, ensure_ascii=False), reply,
                 _dumps(token_ids), _dumps(logprobs), adapter_version, now)).lastrowid

    def conversations(self, user: str | None = None) -> Iterator[dict]:
        """Each stored conversation as {"user", "conversation", "messages"}: the prompt of its latest reply, that
        reply, and the follow-up to it when there is one (oldest conversation first)."""
        db = self._connection()
        where, params = ("WHERE c.user = ?", (user,)) if user is not None else ("", ())
        rows = db.execute(
            "SELECT c.id, c.user, r.id, r.prompt, r.reply FROM conversations c JOIN replies r ON r.id = "
            f"(SELECT MAX(id) FROM replies WHERE conversation = c.id) {where} ORDER BY c.id", params).fetchall()
        for conversation, owner, reply_id, prompt, reply in rows:
            messages = json.loads(prompt) + [{"role": "assistant", "content": reply}]
            followup = db.execute("SELECT followup FROM interactions WHERE reply = ? ORDER BY id LIMIT 1",
                                  (reply_id,)).fetchone()
            if followup is not None:
                messages.append({"role": "user", "content": followup[0]})
            yield {"user": owner, "conversation": conversation, "messages": messages}

    # learning

    def users_with_pending(self, at_least: int) -> list[str]:
        """Users with at least `at_least` interactions not yet learned."""
        return [u for (u,) in self._connection().execute(
            "SELECT user FROM interactions WHERE learned_version IS NULL GROUP BY user HAVING COUNT(*) >= ? "
            "ORDER BY MIN(id)", (at_least,))]

    def pending(self, user: str, limit: int) -> list[PendingItem]:
        """The user's oldest `limit` interactions not yet learned."""
        rows = self._connection().execute(
            "SELECT i.id, r.prompt, r.reply, r.token_ids, r.logprobs, i.followup FROM interactions i "
            "JOIN replies r ON r.id = i.reply WHERE i.user = ? AND i.learned_version IS NULL ORDER BY i.id LIMIT ?",
            (user, limit)).fetchall()
        return [PendingItem(i, json.loads(p), y, _loads(ids), _loads(lps), u) for i, p, y, ids, lps, u in rows]

    def mark_learned(self, user: str, interaction_ids: list[int], version: int) -> None:
        """Mark interactions learned by adapter `version` (recorded as the user's newest), in one transaction."""
        with self.transaction() as db:
            db.executemany("UPDATE interactions SET learned_version = ? WHERE id = ? AND user = ?",
                           [(version, i, user) for i in interaction_ids])
            db.execute("INSERT OR REPLACE INTO adapter_versions VALUES (?, ?, ?, ?)",
                       (user, version, len(interaction_ids), time.time()))

    def adapter_version(self, user: str) -> int:
        """The user's newest adapter version (0: the base model's, before any update)."""
        return self._connection().execute("SELECT COALESCE(MAX(version), 0) FROM adapter_versions WHERE user = ?",
                                          (user,)).fetchone()[0]


def _plain(message: dict) -> dict:
    return {"role": message["role"], "content": message["content"]}


def _dumps(values) -> str | None:
    return None if values is None else json.dumps(list(values))


def _loads(text: str | None):
    return None if text is None else json.loads(text)
