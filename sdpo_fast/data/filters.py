"""Opt-in conversation filters and the presets ("paper": the authors' preprocessing per source format;
"strict": our stricter filter set). Nothing is filtered by default."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from ..utils.checks import check_int


@dataclass(frozen=True)
class ConversationFilter:
    """languages: keep rows whose `language` field is one of these (case-insensitive; rows without
    one are dropped as "filtered_language_missing"); max_message_chars: drop conversations with a
    longer message (system messages included); max_conversation_chars: drop conversations whose
    messages add up to more; min_messages: drop shorter conversations; drop_toxic: drop rows flagged
    toxic (row or message flag); deduplicate: drop exact repeats of an earlier conversation (roles
    and contents; keeps a 16-byte digest per distinct conversation)."""

    languages: frozenset[str] | None = None
    max_message_chars: int | None = None
    max_conversation_chars: int | None = None
    min_messages: int | None = None
    drop_toxic: bool = False
    deduplicate: bool = False

    def __post_init__(self):
        if self.languages is not None:
            languages = (self.languages,) if isinstance(self.languages, str) else self.languages
            languages = tuple(languages) if hasattr(languages, "__iter__") else ()
            if not languages or not all(isinstance(x, str) for x in languages):
                raise TypeError("language must be a str or a non-empty iterable of str")
            object.__setattr__(self, "languages", frozenset(x.lower() for x in languages))
        for name in ("max_message_chars", "max_conversation_chars", "min_messages"):
            value = getattr(self, name)
            check_int(name, value, 1, optional=True)
        for name in ("drop_toxic", "deduplicate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")

    def merged_over(self, base: "ConversationFilter") -> "ConversationFilter":
        """This filter's set fields (not None/False) over `base`'s."""
        return ConversationFilter(**{
            f.name: getattr(self, f.name) if getattr(self, f.name) not in (None, False) else getattr(base, f.name)
            for f in fields(self)
        })

    def rejection(self, messages: list[dict], meta: dict) -> str | None:
        """The reason this conversation is filtered out, or None to keep it (dedup not included)."""
        if self.languages is not None:
            language = meta.get("language")
            if not isinstance(language, str):
                return "filtered_language_missing"
            if language.lower() not in self.languages:
                return "filtered_language"
        if self.min_messages is not None and len(messages) < self.min_messages:
            return "filtered_min_messages"
        if self.max_message_chars is not None and any(len(m["content"]) > self.max_message_chars for m in messages):
            return "filtered_message_chars"
        if self.max_conversation_chars is not None and sum(len(m["content"]) for m in messages) > self.max_conversation_chars:
            return "filtered_conversation_chars"
        if self.drop_toxic and meta.get("toxic") is True:
            return "filtered_toxic"
        return None


@dataclass(frozen=True)
class Preprocessing:
    """One source format's preprocessing, as in the authors' scripts (lasgroup/user_interactions, auxiliary/).

    languages: the row's `language` (stripped, lower-cased) must be one of these; None: no language filter.
    strip: message text is stripped. Empty/whitespace-only and system messages are dropped from every history
    before pairing and windowing, as both scripts do, so no completion or follow-up is empty. measure_raw:
    min_messages and the character limits count the row's raw messages (system and empty ones included,
    unstripped) instead of the cleaned ones. limited_roles: the roles max_message_chars applies to. Pairs are
    adjacent in the cleaned messages. History = the last `max_history` cleaned messages before the completion,
    leading assistant messages dropped, then each run of same-role messages cut to its first;
    history_ends_with_user: a history ending with an assistant message is skipped."""

    name: str
    languages: frozenset[str] | None
    strip: bool
    measure_raw: bool
    min_messages: int
    max_conversation_chars: int
    max_message_chars: int
    limited_roles: frozenset[str]
    history_ends_with_user: bool

    def rejection(self, messages: list[dict], meta: dict) -> str | None:
        """Why the authors' script drops this conversation, or None. `messages` as parsed (unstripped)."""
        if self.languages is not None:
            language = meta.get("language")
            if not isinstance(language, str) or not language.strip():
                return "filtered_language_missing"
            if language.strip().lower() not in self.languages:
                return "filtered_language"
        measured = messages if self.measure_raw else self.cleaned(messages)
        if len(measured) < self.min_messages:
            return "filtered_min_messages"
        if sum(len(m["content"]) for m in measured) > self.max_conversation_chars:
            return "filtered_conversation_chars"
        if any(m["role"] in self.limited_roles and len(m["content"]) > self.max_message_chars for m in measured):
            return "filtered_message_chars"
        return None

    def cleaned(self, messages: list[dict]) -> list[dict]:
        """User/assistant messages with text (stripped when `strip`), in order; other message keys (an assistant's
        token_ids and logprobs) kept."""
        return [{**m, "content": m["content"].strip() if self.strip else m["content"]}
                for m in messages if m["role"] != "system" and m["content"].strip()]


PAPER_WILDCHAT = Preprocessing(
    "wildchat", languages=frozenset({"english", "en"}), strip=True, measure_raw=False, min_messages=3,
    max_conversation_chars=100_000, max_message_chars=4096, limited_roles=frozenset({"user", "assistant"}),
    history_ends_with_user=True,
)
"""auxiliary/preprocess_wildchat.py (also used for OpenAI `messages` rows, which have the same shape)."""

PAPER_WILDFEEDBACK = Preprocessing(
    "wildfeedback", languages=None, strip=False, measure_raw=True, min_messages=3,
    max_conversation_chars=100_000, max_message_chars=4096, limited_roles=frozenset({"assistant"}),
    history_ends_with_user=False,
)
"""auxiliary/preprocess_wildfeedback.py."""

PRESETS = {
    # The authors' preprocessing, chosen per row by its format (row_format).
    "paper": {"wildchat": PAPER_WILDCHAT, "wildfeedback": PAPER_WILDFEEDBACK},
    # Our stricter filter set: English only (rows without a language field dropped), >= 3 messages,
    # <= 100k characters per conversation and <= 4096 per message, system messages included, text as is.
    "strict": ConversationFilter(
        languages=frozenset({"english"}), max_message_chars=4096, max_conversation_chars=100_000, min_messages=3
    ),
}


def row_format(row: dict) -> str:
    """"wildfeedback" for a row read through its `conversations` field, else "wildchat" (the field order of
    rows.parse_row: `conversation`, `conversations`, `messages`)."""
    return "wildfeedback" if "conversation" not in row and "conversations" in row else "wildchat"


def conversation_digest(messages: list[dict]) -> bytes:
    """16-byte digest of the roles and contents, for exact-duplicate removal."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        content = m["content"].encode("utf-8", "surrogatepass")
        h.update(f"{m['role']}:{len(content)}:".encode())
        h.update(content)
    return h.digest()
