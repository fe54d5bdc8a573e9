"""Host data to the device without a synchronization, and a counter of the operations that force one.

A copy from pageable host memory makes the host wait for the device's queue; `upload` stages host values in
pinned memory and copies them asynchronously (CUDA), so a training step can queue its work without waiting.
`SyncCounter` counts, on any device, the operations that synchronize on CUDA: reading a scalar
(`item`/`bool`/`float`), `nonzero`, boolean-mask indexing, `masked_select`, `repeat_interleave` without an output
size, and tensors made from host data outside `upload`.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import traceback
from collections.abc import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_uploading: contextvars.ContextVar[bool] = contextvars.ContextVar("sdpo_uploading", default=False)


def upload(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A 1-D tensor of host `values` on `device`: pinned and non-blocking on CUDA (no host wait)."""
    device = torch.device(device)
    token = _uploading.set(True)
    try:
        if device.type == "cuda":
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=device)
    finally:
        _uploading.reset(token)


_SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.repeat_interleave.Tensor", "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


def _forces_sync(func, args) -> bool:
    name = str(func)
    if name in _SYNCING:
        if name.startswith("aten.lift_fresh"):
            return not _uploading.get()
        return True
    if name.startswith(("aten.index.Tensor", "aten.index_put")):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the ops under it that force a device->host synchronization on CUDA; `where` keeps, per op name,
    the innermost sdpo_fast (or transformers) frame that issued it."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _forces_sync(func, args):
            self.count += 1
            frames = [f for f in traceback.extract_stack() if "sdpo_fast" in f.filename or "transformers" in f.filename]
            self.where[(str(func), f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    counter = SyncCounter()
    with counter:
        yield counter
