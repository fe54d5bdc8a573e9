"""Style checkers for replies: emojis, length and formality markers (the tiny demo's preferred style: no emojis)."""
from __future__ import annotations

import re
from collections.abc import Sequence

_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")
_WORD = re.compile(r"[A-Za-z']+")
FORMAL_MARKERS = ("certainly", "i hope this information is helpful", "here is an overview",
                  "here are some recommendations", "kind regards", "dear")
CASUAL_MARKERS = ("sure thing", "here's", "have fun", "hey", "awesome", "gonna")


def count_emojis(text: str) -> int:
    """Emoji code points (pictographs, dingbats, symbols, variation selector 16) in `text`."""
    return len(_EMOJI.findall(text))


def has_emoji(text: str) -> bool:
    return _EMOJI.search(text) is not None


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def formality(text: str) -> int:
    """Formal markers minus casual markers found in `text` (case-insensitive); > 0 formal, < 0 casual."""
    lower = text.lower()
    return sum(m in lower for m in FORMAL_MARKERS) - sum(m in lower for m in CASUAL_MARKERS)


def emoji_rate(texts: Sequence[str]) -> float:
    """Share of `texts` with at least one emoji."""
    if not texts:
        raise ValueError("emoji_rate needs at least one text")
    return sum(map(has_emoji, texts)) / len(texts)


def is_degenerate(text: str) -> bool:
    """An empty reply, or one that repeats a word 4 times in a row (a collapsed model's "s s s s ...")."""
    words = text.split()
    return not words or any(len(set(words[i:i + 4])) == 1 for i in range(len(words) - 3))


def degenerate_rate(texts: Sequence[str]) -> float:
    if not texts:
        raise ValueError("degenerate_rate needs at least one text")
    return sum(map(is_degenerate, texts)) / len(texts)


def preferred_style_rate(texts: Sequence[str]) -> float:
    """Share of `texts` in the bundled users' preferred style: a real reply (not degenerate) without emojis."""
    if not texts:
        raise ValueError("preferred_style_rate needs at least one text")
    return sum(not has_emoji(t) and not is_degenerate(t) for t in texts) / len(texts)
