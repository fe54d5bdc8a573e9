"""Opt-in conversation filters and the authors' preset. Nothing is filtered by default."""
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


PRESETS = {
    # The authors' preprocessing (../shared/ANCHORS.md): WildChat filtered to English, conversations
    # of >= 3 messages and <= 100k characters, messages <= 4096 characters.
    "paper": ConversationFilter(
        languages=frozenset({"english"}), max_message_chars=4096, max_conversation_chars=100_000, min_messages=3
    ),
}


def conversation_digest(messages: list[dict]) -> bytes:
    """16-byte digest of the roles and contents, for exact-duplicate removal."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        content = m["content"].encode("utf-8", "surrogatepass")
        h.update(f"{m['role']}:{len(content)}:".encode())
        h.update(content)
    return h.digest()
