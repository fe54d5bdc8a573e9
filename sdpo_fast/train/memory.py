"""Live-storage accounting: a TorchDispatchMode that counts every storage an op creates until it is freed.

On real tensors the count is what a caching allocator hands out (`torch.cuda.max_memory_allocated`, each block
rounded up to 512 bytes); on fake tensors (`FakeTensorMode`) the same count needs no memory at all, so the
planner measures a step of a model that does not fit this machine.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what this rank's memory holds); any other tensor as it is."""
    return getattr(tensor, "_local_tensor", tensor)


class StorageCounter(TorchDispatchMode):
    """Counts live storages by identity, each under a category (the `phase` current at its allocation unless
    `tag` moves it). Tracks the peak, the phase and module at the peak, and each category's bytes then.

    phase: set by the caller (a string); module: a callable returning the innermost module's name, or None;
    categories: phase -> category of what it allocates (default: the phase itself).
    """

    def __init__(self, module=None, categories: dict[str, str] | None = None):
        super().__init__()
        self.categories = dict(categories or {})
        self.phase = "setup"
        self.module = module or (lambda: "")
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.by_category: dict[str, int] = defaultdict(int)
        self.current = 0
        self.reset_peak()

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_phase, self.peak_module = self.phase, ""
        self.peak_breakdown = dict(self.by_category)
        self.phase_peaks: dict[str, int] = {}

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)

    def _key(self, storage) -> int:
        return storage._cdata

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count `tensor`'s storage (a DTensor's: its shard's; if not yet counted) under `category` (default: the
        current phase)."""
        storage = local_shard(tensor).untyped_storage()
        key = self._key(storage)
        if key in self._live:
            return
        size = _rounded(storage.nbytes())
        category = category or self.categories.get(self.phase, self.phase)
        self._live[key] = (size, category)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.by_category[category] += size
        self.current += size
        if self.current > self.peak:
            self.peak, self.peak_phase, self.peak_module = self.current, self.phase, self.module()
            self.peak_breakdown = dict(self.by_category)
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def tag(self, tensor: torch.Tensor, category: str) -> None:
        """Move `tensor`'s storage (counting it if new) to `category`."""
        key = self._key(local_shard(tensor).untyped_storage())
        if key not in self._live:
            self.track(tensor, category)
            return
        size, old = self._live[key]
        if old != category:
            self.by_category[old] -= size
            self.by_category[category] += size
            self._live[key] = (size, category)

    def resized(self, tensor: torch.Tensor) -> None:
        """Recount `tensor`'s storage at its current size, after an in-place storage resize (FSDP2 frees and
        re-allocates gathered parameters that way); a grown storage counts as allocated now."""
        storage = local_shard(tensor).untyped_storage()
        key = self._key(storage)
        if key not in self._live:
            self.track(tensor)
            return
        size, category = self._live.pop(key)
        self.by_category[category] -= size
        self.current -= size
        self._refs.pop(key, None)
        if storage.nbytes():
            self.track(tensor, category if _rounded(storage.nbytes()) <= size else None)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None:
            self.by_category[entry[1]] -= entry[0]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.track(t)
        return out
