"""Interaction tuples (history x, completion y, follow-up u) cut from one conversation."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from ..utils.checks import check_int

ROLES = ("system", "user", "assistant")


@dataclass
class Interaction:
    """history: [{"role", "content"}] ending at the user turn answered by `completion`;
    followup: the user message that came right after `completion`; meta: source ids, model, language…;
    completion_ids / completion_logprobs: the completion's sampled token ids and the sampler's log-prob of each
    (same length), when the data has them (None: the text is tokenized; no importance clipping)."""

    history: list[dict]
    completion: str
    followup: str
    meta: dict = field(default_factory=dict)
    completion_ids: list[int] | None = None
    completion_logprobs: list[float] | None = None


def extract_interactions(
    messages: list[dict],
    max_history: int = 5,
    *,
    meta: dict | None = None,
    skipped: collections.Counter | None = None,
) -> list[Interaction]:
    """One Interaction per assistant message directly followed by a user message.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    History = the last `max_history` messages before the assistant message, trimmed at the front
    until it starts with a user message; a system message at index 0 is put in front of every
    history and does not count toward `max_history`. Interactions whose completion or follow-up is
    empty/whitespace, or whose history has no user message, are skipped and counted in `skipped`
    (reasons "empty_completion", "empty_followup", "no_user_message_in_history").
    Each Interaction gets a copy of `meta` plus "assistant_index": the completion's index in `messages`, and the
    assistant message's "token_ids" and "logprobs" when it has them (see rows.parse_row).
    """
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise TypeError(f"messages[{i}]['content'] must be a str")
    check_int("max_history", max_history, 1)
    return extract_validated(messages, max_history, meta or {}, skipped if skipped is not None else collections.Counter())


def extract_validated(
    messages: list[dict], max_history: int, meta: dict, skipped: collections.Counter
) -> list[Interaction]:
    """extract_interactions without argument checks, for messages already normalized by the loader."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    interactions = []
    for i in range(start, len(messages) - 1):
        if messages[i]["role"] != "assistant" or messages[i + 1]["role"] != "user":
            continue
        completion = messages[i]["content"]
        followup = messages[i + 1]["content"]
        if not completion.strip():
            skipped["empty_completion"] += 1
            continue
        if not followup.strip():
            skipped["empty_followup"] += 1
            continue
        window = messages[max(start, i - max_history):i]
        first_user = next((k for k, m in enumerate(window) if m["role"] == "user"), None)
        if first_user is None:
            skipped["no_user_message_in_history"] += 1
            continue
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:start] + window[first_user:]]
        interactions.append(Interaction(history, completion, followup, {**meta, "assistant_index": i},
                                        *_sampled(messages[i])))
    return interactions


def extract_preprocessed(
    messages: list[dict], recipe, max_history: int, meta: dict, skipped: collections.Counter
) -> list[Interaction]:
    """Interactions as the authors' script for `recipe`'s format cuts them (filters.Preprocessing; the
    conversation already passed `recipe.rejection`). Skips: "no_user_message_in_history",
    "history_ends_with_assistant". Pairs and windows come from the cleaned messages (no empty ones); meta gets
    "assistant_index": the completion's index in them (the scripts' `turn_id`)."""
    cleaned = recipe.cleaned(messages)
    interactions = []
    for i in range(len(cleaned) - 1):
        if cleaned[i]["role"] != "assistant" or cleaned[i + 1]["role"] != "user":
            continue
        window = cleaned[max(0, i - max_history):i]
        while window and window[0]["role"] != "user":
            window = window[1:]
        if not window:
            skipped["no_user_message_in_history"] += 1
            continue
        history = [{"role": window[0]["role"], "content": window[0]["content"]}]
        for m in window[1:]:
            if m["role"] != history[-1]["role"]:
                history.append({"role": m["role"], "content": m["content"]})
        if recipe.history_ends_with_user and history[-1]["role"] != "user":
            skipped["history_ends_with_assistant"] += 1
            continue
        interactions.append(Interaction(history, cleaned[i]["content"], cleaned[i + 1]["content"],
                                        {**meta, "assistant_index": i}, *_sampled(cleaned[i])))
    return interactions


def _sampled(message: dict) -> tuple[list[int] | None, list[float] | None]:
    return message.get("token_ids"), message.get("logprobs")
