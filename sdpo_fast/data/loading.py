"""load_interactions: stream Interaction tuples from a file, directory or Hub dataset."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from ..utils.checks import check_int
from .filters import PRESETS, ConversationFilter, conversation_digest, row_format
from .interactions import Interaction, extract_preprocessed, extract_validated
from .rows import BadRow, parse_row
from .sources import InvalidRow, Rows, resolve_source

MAX_BAD_ROWS_KEPT = 1000


class BadRowLocation(NamedTuple):
    """Where a bad row is: file (or dataset id), 1-based line/row number, reason."""

    file: str
    number: int
    reason: str


class BadRowError(ValueError):
    """Raised in strict mode at the first bad row."""

    def __init__(self, location: BadRowLocation):
        super().__init__(f"{location.file}: row {location.number}: {location.reason}")
        self.location = location


@dataclass
class LoadStats:
    """Counts for the latest pass. rows: rows read (bad ones included); conversations: rows parsed
    and kept by the filters; skipped: reason -> count for bad rows, filtered conversations and
    skipped interactions; bad_rows: locations of the first MAX_BAD_ROWS_KEPT bad rows."""

    rows: int = 0
    conversations: int = 0
    interactions: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    bad_rows: list[BadRowLocation] = field(default_factory=list)


class InteractionStream:
    """Iterable of Interaction; each iteration re-reads the source and resets `stats`.

    `stats`, `skipped` and `bad_rows` describe the latest (or ongoing) pass."""

    def __init__(self, rows: Callable[[], Rows], max_history: int, strict: bool, conversation_filter: ConversationFilter,
                 recipes: dict | None = None):
        self._rows = rows
        self._recipes = recipes
        self._max_history = max_history
        self._strict = strict
        self._filter = conversation_filter
        self.stats = LoadStats()

    @property
    def skipped(self) -> collections.Counter:
        return self.stats.skipped

    @property
    def bad_rows(self) -> list[BadRowLocation]:
        return self.stats.bad_rows

    def __iter__(self) -> Iterator[Interaction]:
        stats = self.stats = LoadStats()
        seen: set[bytes] = set()
        for file, number, row in self._rows():
            stats.rows += 1
            try:
                if isinstance(row, InvalidRow):
                    raise BadRow(row.reason)
                messages, meta = parse_row(row)
            except BadRow as bad:
                location = BadRowLocation(file, number, bad.reason)
                if self._strict:
                    raise BadRowError(location) from None
                stats.skipped[bad.reason] += 1
                if len(stats.bad_rows) < MAX_BAD_ROWS_KEPT:
                    stats.bad_rows.append(location)
                continue
            recipe = self._recipes[row_format(row)] if self._recipes else None
            reason = self._filter.rejection(messages, meta)
            if reason is None and recipe is not None:
                reason = recipe.rejection(messages, meta)
            if reason is None and self._filter.deduplicate:
                digest = conversation_digest(messages)
                reason = "duplicate" if digest in seen else None
                seen.add(digest)
            if reason is not None:
                stats.skipped[reason] += 1
                continue
            stats.conversations += 1
            meta["row"] = number
            if recipe is not None:
                interactions = extract_preprocessed(messages, recipe, self._max_history, meta, stats.skipped)
            else:
                interactions = extract_validated(messages, self._max_history, meta, stats.skipped)
            for interaction in interactions:
                stats.interactions += 1
                yield interaction


def load_interactions(
    source: str | os.PathLike,
    *,
    max_history: int = 5,
    strict: bool = False,
    split: str = "train",
    preset: str | None = None,
    language: str | list[str] | None = None,
    max_message_chars: int | None = None,
    max_conversation_chars: int | None = None,
    min_messages: int | None = None,
    drop_toxic: bool = False,
    deduplicate: bool = False,
) -> InteractionStream:
    """Stream interactions from JSONL, JSON, Parquet, a directory of those, a `datasets.save_to_disk`
    directory (`split` picks from a DatasetDict) or a Hub dataset id (online only).

    Rows may be WildChat (`conversation`), WildFeedback (`conversations`) or OpenAI (`messages`).
    Bad rows are skipped and counted with their location; strict=True raises BadRowError at the
    first. Filters are off by default. `preset="paper"`: each row is preprocessed as the authors' script for
    its format does (filters.PAPER_WILDCHAT for WildChat/OpenAI rows, PAPER_WILDFEEDBACK for WildFeedback
    rows), the filter arguments given applying on top; `preset="strict"` fills the filter arguments left
    unset with our stricter set. The source is checked now; rows are read while iterating.
    """
    check_int("max_history", max_history, 1)
    if not isinstance(strict, bool):
        raise TypeError("strict must be a bool")
    if not isinstance(split, str):
        raise TypeError("split must be a str")
    conversation_filter = ConversationFilter(
        languages=language,
        max_message_chars=max_message_chars,
        max_conversation_chars=max_conversation_chars,
        min_messages=min_messages,
        drop_toxic=drop_toxic,
        deduplicate=deduplicate,
    )
    recipes = None
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if isinstance(PRESETS[preset], ConversationFilter):
            conversation_filter = conversation_filter.merged_over(PRESETS[preset])
        else:
            recipes = PRESETS[preset]
    return InteractionStream(resolve_source(source, split), max_history, strict, conversation_filter, recipes)
