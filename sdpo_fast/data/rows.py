"""One dataset row → normalized messages. Row formats:

- WildChat: `conversation` = [{"role": "user"|"assistant"|"system", "content": str, ...}]
- WildFeedback: `conversations` = [{"from": "human"|"gpt"|"system", "value": str}]
- OpenAI-style: `messages` = [{"role": "user"|"assistant"|"system", "content": str}]

An assistant message may also carry its sampled tokens, as a rollout log holds them: "token_ids" (the
completion's token ids, used instead of re-tokenizing the text) and optionally "logprobs" (the sampler's
log-probability of each of those tokens, same length, finite and <= 0; they enable importance clipping).
"""
from __future__ import annotations

from typing import NamedTuple

from ..utils.checks import is_finite_number

_FORMATS = (
    ("conversation", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
    ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
)
_ID_FIELDS = ("conversation_id", "conversation_hash", "id")
# Scalar row fields kept as labels in each interaction's meta ("kind"/"label": user-defined grouping labels).
_META_FIELDS = ("model", "language", "redacted", "kind", "label")
MAX_MESSAGE_CHARS = 1 << 20
"""A message longer than this (about 250k tokens, far beyond any prompt limit) makes its row bad
(message_too_large) before anything tokenizes it."""


class BadRow(Exception):
    """A row that cannot be read; `reason` is a short fixed string (never row content)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Conversation(NamedTuple):
    """messages: [{"role", "content"}] with roles system|user|assistant; meta: ids, model,
    language, toxic (row flag or any message flag), when the row has them."""

    messages: list[dict]
    meta: dict


def parse_row(row) -> Conversation:
    """Normalize one row; raises BadRow (reasons: row_not_an_object, missing_conversation_field,
    conversation_not_a_list, message_not_an_object, message_missing_field, unknown_role,
    non_string_content, message_too_large, and for assistant token fields: bad_token_ids, bad_logprobs,
    positive_logprobs, logprobs_length_mismatch, logprobs_without_token_ids).

    Messages are {"role", "content"}, assistant ones with "token_ids" (list[int]) and "logprobs"
    (list[float] or None) when the row has token ids."""
    if not isinstance(row, dict):
        raise BadRow("row_not_an_object")
    for field, role_key, content_key, roles in _FORMATS:
        if field in row:
            break
    else:
        raise BadRow("missing_conversation_field")
    raw = row[field]
    if not isinstance(raw, list):
        raise BadRow("conversation_not_a_list")
    messages = []
    toxic = row.get("toxic") is True
    for message in raw:
        if not isinstance(message, dict):
            raise BadRow("message_not_an_object")
        if role_key not in message or content_key not in message:
            raise BadRow("message_missing_field")
        role = roles.get(message[role_key]) if isinstance(message[role_key], str) else None
        if role is None:
            raise BadRow("unknown_role")
        content = message[content_key]
        if not isinstance(content, str):
            raise BadRow("non_string_content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise BadRow("message_too_large")
        tokens = _sampled_tokens(message) if role == "assistant" else {}
        messages.append({"role": role, "content": content, **tokens})
        toxic = toxic or message.get("toxic") is True
    meta = {}
    for key in _ID_FIELDS:
        if isinstance(row.get(key), (str, int)) and not isinstance(row.get(key), bool):
            meta["conversation_id"] = row[key]
            break
    for key in _META_FIELDS:
        if isinstance(row.get(key), (str, int, float, bool)):
            meta[key] = row[key]
    if "toxic" in row or any(isinstance(m, dict) and "toxic" in m for m in raw):
        meta["toxic"] = toxic
    return Conversation(messages, meta)


def _sampled_tokens(message: dict) -> dict:
    """{"token_ids", "logprobs"} of an assistant message that has token ids, else {}; BadRow when malformed."""
    ids, logprobs = message.get("token_ids"), message.get("logprobs")
    if ids is None:
        if logprobs is not None:
            raise BadRow("logprobs_without_token_ids")
        return {}
    if not isinstance(ids, list) or not ids or len(ids) > MAX_MESSAGE_CHARS or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadRow("bad_token_ids")
    if logprobs is not None:
        if not isinstance(logprobs, list) or not all(is_finite_number(x) for x in logprobs):
            raise BadRow("bad_logprobs")
        if len(logprobs) != len(ids):
            raise BadRow("logprobs_length_mismatch")
        if any(x > 0 for x in logprobs):
            raise BadRow("positive_logprobs")
        logprobs = [float(x) for x in logprobs]
    return {"token_ids": list(ids), "logprobs": logprobs}
