"""Packing token sequences into one row without padding, and token-budget micro-batches."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..utils.checks import check_int
from ..utils.device import upload


@dataclass(frozen=True)
class PackedRow:
    """Sequences concatenated into one row.

    input_ids, position_ids: (1, T) int64; positions restart at each sequence's offset (0 unless given).
    lengths: tokens per sequence; starts: each sequence's first index in the row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: tuple[int, ...]
    starts: tuple[int, ...]


def pack(sequences: Sequence[Sequence[int]], *, position_offsets: Sequence[int] | None = None,
         device: torch.device | str = "cpu") -> PackedRow:
    """Pack token-id sequences into one row; sequence i's positions run from position_offsets[i] (default 0)."""
    if not sequences:
        raise ValueError("sequences must be non-empty")
    offsets = [0] * len(sequences) if position_offsets is None else [int(o) for o in position_offsets]
    if len(offsets) != len(sequences):
        raise ValueError(f"position_offsets has {len(offsets)} entries, sequences {len(sequences)}")
    lengths = tuple(len(s) for s in sequences)
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    ids = upload([t for s in sequences for t in s], torch.long, device)
    positions = upload([o + k for o, n in zip(offsets, lengths) for k in range(n)], torch.long, device)
    return PackedRow(ids.view(1, -1), positions.view(1, -1), lengths, tuple(starts))


def gather_index(starts: Sequence[int], first: Sequence[int], counts: Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Row indices starts[i] + first[i] + k for k < counts[i], concatenated over i: (sum(counts),) int64."""
    return upload([s + f + k for s, f, c in zip(starts, first, counts) for k in range(c)], torch.long, device)


def plan_micro_batches(costs: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices so each group's total cost is at most `max_tokens` (first-fit decreasing).

    An item costlier than `max_tokens` gets a group of its own. Deterministic: items are taken by
    decreasing cost, ties by index; groups keep creation order and list their indices ascending.
    """
    check_int("max_tokens", max_tokens, 1)
    costs = [int(c) for c in costs]
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        for g, load in enumerate(loads):
            if load + costs[i] <= max_tokens:
                groups[g].append(i)
                loads[g] += costs[i]
                break
        else:
            groups.append([i])
            loads.append(costs[i])
    return [sorted(g) for g in groups]
