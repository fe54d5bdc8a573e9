"""`sdpo-fast serve export`: the stored conversations as WildChat-format JSONL rows that `sdpo-fast train` reads.

One row per conversation path: a served reply with the prompt it answered (`conversation` = prompt + reply). A
conversation's newest reply always gets a row; an older reply gets one only when its path holds a follow-up no row
written so far holds (a client that edited an earlier message and resent it branched the conversation). So every
stored interaction (x = the messages before a reply, y = the reply, u = the user message after it) is in the file, a
regenerated reply adds no duplicate, and only a true branch repeats the interactions before its branch point.

Rows carry text only (no sampled token ids: `train` may tokenize with another model) and are read from one SQLite
snapshot; the file is written atomically (temporary file, then rename), owner-only (0600).
"""
from __future__ import annotations

import datetime
import json
import os
import sqlite3
from pathlib import Path

from ..utils.files import write_text_atomic

DB_FILE = "serve.db"


def _rows(db: sqlite3.Connection, user: str | None) -> list[dict]:
    """The rows to write, oldest conversation first, each conversation's paths in the order they were served."""
    where, params = ("WHERE user = ?", (user,)) if user is not None else ("", ())
    replies = db.execute(f"SELECT id, conversation, user, prompt, reply, created FROM replies {where} "
                         "ORDER BY conversation, id DESC", params).fetchall()
    rows, conversation, covered = [], None, set()
    for reply_id, conv, owner, prompt, reply, created in replies:
        if conv != conversation:
            conversation, covered, first = conv, set(), True
        messages = [{"role": m["role"], "content": m["content"]} for m in json.loads(prompt)]
        messages.append({"role": "assistant", "content": reply})
        followups = {json.dumps(messages[:i + 2], ensure_ascii=False) for i in range(len(messages) - 1)
                     if messages[i]["role"] == "assistant" and messages[i + 1]["role"] == "user"}
        if first or not followups <= covered:
            rows.append((conv, reply_id, {
                "conversation_hash": f"sdpo-serve-{owner}-{conv}-{reply_id}",
                "model": "sdpo-serve",
                "user": owner,
                "timestamp": datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(),
                "turn": sum(m["role"] == "user" for m in messages),
                "conversation": messages,
            }))
            covered |= followups
            first = False
    return [row for _, _, row in sorted(rows, key=lambda item: item[:2])]


def export(state_dir: str | os.PathLike, out: str | os.PathLike, user: str | None = None) -> int:
    """Write the conversations stored in `state_dir` (all users', or `user`'s) to `out` as JSONL; returns the
    number of rows. ValueError naming --state-dir / --user when there is no service state or no such user."""
    path = Path(state_dir) / DB_FILE
    if not path.is_file():
        raise ValueError(f"--state-dir {str(state_dir)!r} holds no service state ({DB_FILE} missing): pass the "
                         "directory `sdpo-fast serve run` used")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    try:
        db.execute("BEGIN")
        if user is not None and db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is None:
            raise ValueError(f"--user {user!r}: no such user in {str(state_dir)!r} (see `sdpo-fast serve list-users`)")
        rows = _rows(db, user)
        db.execute("COMMIT")
    finally:
        db.close()
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), mode=0o600)
    return len(rows)
