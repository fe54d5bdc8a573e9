"""Per-layer K/V of each sequence's shared prefix, taken from the packed student pass for the teacher pass."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..utils.device import upload


class PrefixKVCache:
    """Detached prefix K/V, one entry per attention layer, for the sequences of one micro-batch.

    Sequence i of the packed student row has `sequence_lengths[i]` tokens, of which the first
    `prefix_lengths[i]` form its prefix. Stored K/V are packed over sequences: (sum(prefix_lengths), Hkv, D).
    `release()` frees them once the teacher pass has read them: gradient checkpointing keeps the packed call,
    and with it this cache, alive until backward ends, and its recomputation of the student pass stores nothing.
    """

    def __init__(self, prefix_lengths: Sequence[int], sequence_lengths: Sequence[int]):
        self.prefix_lengths = tuple(int(p) for p in prefix_lengths)
        self.sequence_lengths = tuple(int(n) for n in sequence_lengths)
        if len(self.prefix_lengths) != len(self.sequence_lengths):
            raise ValueError(f"prefix_lengths has {len(self.prefix_lengths)} entries, "
                             f"sequence_lengths {len(self.sequence_lengths)}")
        for i, (p, n) in enumerate(zip(self.prefix_lengths, self.sequence_lengths)):
            if not 0 <= p <= n:
                raise ValueError(f"prefix_lengths[{i}]={p} must lie in [0, sequence_lengths[{i}]={n}]")
        self._kv: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._store_indices: dict[torch.device, torch.Tensor] = {}
        self.released = False

    @property
    def num_sequences(self) -> int:
        return len(self.prefix_lengths)

    @property
    def num_prefix_tokens(self) -> int:
        return sum(self.prefix_lengths)

    def _store_index(self, device: torch.device) -> torch.Tensor:
        """The packed row's prefix positions, uploaded once per cache (not once per layer)."""
        if device not in self._store_indices:
            rows, offset = [], 0
            for p, n in zip(self.prefix_lengths, self.sequence_lengths):
                rows += range(offset, offset + p)
                offset += n
            self._store_indices[device] = upload(rows, torch.long, device)
        return self._store_indices[device]

    def is_stored(self, layer: torch.nn.Module) -> bool:
        return layer in self._kv

    def store(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep the prefix rows of the packed student key/value (T, Hkv, D), detached; no-op if `layer` has them.

        The no-op (also after `release`) makes gradient-checkpoint recomputation of the student pass leave the
        cache untouched.
        """
        if layer in self._kv or self.released:
            return
        if key.shape[0] != sum(self.sequence_lengths):
            raise ValueError(f"expected {sum(self.sequence_lengths)} packed student rows, got {key.shape[0]}")
        index = self._store_index(key.device)
        self._kv[layer] = (key.detach().index_select(0, index), value.detach().index_select(0, index))

    def release(self) -> None:
        """Drop the stored K/V (after the teacher pass); later `store` calls do nothing, `join` raises."""
        self._kv.clear()
        self._store_indices.clear()
        self.released = True

    def join_index(self, suffix_lengths: Sequence[int], device: torch.device) -> torch.Tensor:
        """Index into cat([prefix rows, suffix rows]) that yields [prefix i; suffix i] for each i, packed."""
        if len(suffix_lengths) != self.num_sequences:
            raise ValueError(f"suffix_lengths has {len(suffix_lengths)} entries, expected {self.num_sequences}")
        rows, prefix_start, suffix_start = [], 0, self.num_prefix_tokens
        for p, s in zip(self.prefix_lengths, suffix_lengths):
            rows += [*range(prefix_start, prefix_start + p), *range(suffix_start, suffix_start + s)]
            prefix_start, suffix_start = prefix_start + p, suffix_start + s
        return upload(rows, torch.long, device)

    def join(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
             index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed suffix key/value (S, Hkv, D) -> packed [prefix; suffix] key/value, using `join_index`'s index."""
        if self.released:
            raise RuntimeError("this prefix K/V cache was released after its teacher pass; make a new one")
        if layer not in self._kv:
            raise RuntimeError("no prefix K/V stored for this layer: run the student pass with this cache first")
        prefix_key, prefix_value = self._kv[layer]
        if prefix_key.shape[1:] != key.shape[1:] or prefix_key.dtype != key.dtype:
            raise ValueError(f"stored prefix K/V {tuple(prefix_key.shape[1:])} {prefix_key.dtype} do not match "
                             f"suffix K/V {tuple(key.shape[1:])} {key.dtype}")
        key = torch.cat([prefix_key, key]).index_select(0, index)
        value = torch.cat([prefix_value, value]).index_select(0, index)
        return key, value
