"""Loss backends: the three ops every backend implements, and how one is chosen.

A backend computes, from hidden (N, d) and weight (V, d) in one float dtype and targets (N,) int64 in [0, V),
with z = hidden @ weight.T * inv_temperature:

- `token_logprobs(hidden, weight, targets, inv_temperature) -> (logprobs, lse)`: log_softmax(z)[target] (N,)
  fp32, and what `grad` needs saved (the logsumexp (N,) fp32, or None where `grad` recomputes it).
- `grad(hidden, weight, targets, lse, coef, inv_temperature, need_hidden, need_weight, grad_weight_dtype=fp32)
  -> (grad_hidden, grad_weight)`: gradients of L = sum_n coef[n] * -log_softmax(z_n)[target_n] with coef (N,)
  fp32 held constant; grad_hidden (N, d) in hidden's dtype, grad_weight (V, d) accumulated in fp32 and returned
  in grad_weight_dtype, each None when not needed.
- `divergence(...)`: the logit modes' sweep (`chunked_divergence.divergence_sweep`).

Each op also takes `softcap` (None: none): the logits are then c * tanh(hidden @ weight.T / c) * inv_temperature
(`loss.head`); `divergence` takes the teacher's `teacher_softcap` and `teacher_inv_temperature` besides.

The first two are the recompute path (10·N·d·V FLOPs with a teacher head). `row_ops` (a `gemm_sweep.RowOps`) serves
the grad-in-forward path (`gemm_sweep`: logits from GEMMs, gradients formed in the forward, 8·N·d·V), whose
workspace budget defaults to `default_workspace_bytes()`.
"""
from __future__ import annotations

import os
from typing import Protocol

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


class LossBackend(Protocol):
    name: str
    row_ops: object

    def token_logprobs(self, hidden, weight, targets, inv_temperature: float, softcap: float | None = None): ...

    def grad(self, hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool,
             need_weight: bool, grad_weight_dtype: torch.dtype = torch.float32, softcap: float | None = None): ...

    def default_workspace_bytes(self) -> int: ...


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name `backend` means for tensors on `device`; ValueError when it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the `triton` package; use backend='torch' instead")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU tensors); "
                f"got tensors on {device}"
            )
    return backend


def get_backend(name: str) -> LossBackend:
    """The backend object of a resolved name ("torch" or "triton")."""
    if name == "triton":
        from .triton_fused import TritonBackend
        return TritonBackend()
    from .torch_chunked import TorchBackend
    return TorchBackend()


def default_workspace_bytes(backend: str, cuda: bool) -> int | None:
    """The workspace budget `sdpo_loss(workspace_bytes=None)` takes on `backend` ("auto" resolved as on a machine
    with (cuda) or without a GPU): SDPO_FAST_TRITON_WORKSPACE_MB or SDPO_FAST_TORCH_CHUNK_MB; None for "reference"."""
    if backend == "reference":
        return None
    if backend == "auto":
        backend = "triton" if cuda and triton_available() else "torch"
    return get_backend(backend).default_workspace_bytes()
