"""Checkpointed layers' inputs held in CPU memory until backward (`--offload-activations`).

A non-reentrant checkpoint saves its layer's positional inputs (the hidden states) through the saved-tensor hooks
current when it is called; `OffloadedInputs.wrap` calls it under this module's hooks, so that input leaves the
device in forward and comes back for the recompute (inside the layer the checkpoint's own hooks keep nothing).
On CUDA the copies run on side streams: device-to-host into pinned memory as forward goes on, host-to-device of
the next layer's input (the one saved before) while the current layer recomputes, the pattern of torchtune's
`OffloadActivations`. transformers' `offload=True` copies on the compute stream, so the step waits for each copy.
"""
from __future__ import annotations

import functools
import weakref

import torch


class _Held:
    """One offloaded input: its host copy, the event that copy waits on, and the device copy once fetched."""

    def __init__(self, device: torch.device, host, event, previous: weakref.ref | None):
        self.device, self.host, self.event, self.previous = device, host, event, previous
        self.fetched: torch.Tensor | None = None
        self.unpacked = False


class OffloadedInputs:
    """Pack/unpack pair for `torch.autograd.graph.saved_tensors_hooks` moving the checkpointed layers' inputs on
    `device_types` to the host and back; tensors on other devices (CPU: nothing to gain) are kept as they are.
    Unpacking one input starts fetching the input saved before it (the layer below, recomputed next)."""

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)):
        self.device_types = device_types
        self._last: weakref.ref | None = None  # the graph holds what it saved; a freed graph frees it
        self._streams: dict[tuple[str, torch.device], torch.cuda.Stream] = {}

    def wrap(self, checkpoint_fn):
        """`checkpoint_fn` (a layer's `_gradient_checkpointing_func`) called under these hooks."""

        @functools.wraps(checkpoint_fn)
        def offloaded(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_fn(*args, **kwargs)

        return offloaded

    def pack(self, x: torch.Tensor):
        if x.device.type not in self.device_types:
            return x
        held = _Held(x.device, *self.to_host(x), self._last)
        self._last = weakref.ref(held)
        return held

    def unpack(self, held):
        if isinstance(held, torch.Tensor):
            return held
        out = self.ready(held.fetched if held.fetched is not None else self.to_device(held), held.device)
        held.fetched, held.unpacked = None, True
        previous = held.previous() if held.previous is not None else None
        if previous is not None and previous.fetched is None and not previous.unpacked:
            previous.fetched = self.to_device(previous)  # copied while this layer recomputes
        return out

    def _stream(self, name: str, device: torch.device) -> torch.cuda.Stream:
        if (name, device) not in self._streams:
            self._streams[name, device] = torch.cuda.Stream(device)
        return self._streams[name, device]

    def to_host(self, x: torch.Tensor):
        """(host copy of `x`, event marking the copy done or None); on CUDA pinned, copied on a side stream."""
        if x.device.type != "cuda":
            return x.detach().to("cpu", copy=True), None
        stream = self._stream("d2h", x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            host.copy_(x.detach(), non_blocking=True)
            x.record_stream(stream)  # its memory is not reused before the copy ends
            return host, stream.record_event()

    def to_device(self, held: _Held) -> torch.Tensor:
        """`held`'s tensor back on its device; on CUDA copied on a side stream once the host copy is done."""
        if held.device.type != "cuda":
            return held.host.to(held.device, copy=True)
        stream = self._stream("h2d", held.device)
        stream.wait_event(held.event)
        with torch.cuda.stream(stream):
            return held.host.to(held.device, non_blocking=True)

    def ready(self, out: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`out` usable on the compute stream (it waits for the host-to-device copies issued so far)."""
        if device.type == "cuda":
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._stream("h2d", device))
            out.record_stream(current)
        return out
