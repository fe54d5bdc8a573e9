"""`sdpo_loss`: the SDPO policy-gradient loss computed straight from hidden states and the lm_head weight."""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from . import ops_torch
from .autograd import SDPOFunction
from .reference import reference_sdpo_loss

BACKENDS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SDPOStats(NamedTuple):
    """Per-token statistics, each shaped like target_ids, float32, detached, 0 at ignored positions."""

    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the `triton` package; use backend='torch' instead")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU tensors); "
                f"got tensors on {device}"
            )
    return backend


def _check_float(name: str, tensor, ndim: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def _check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")
    if dtype and tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def _check_per_token(name: str, tensor, target_ids: torch.Tensor) -> None:
    _check_float(name, tensor)
    if tensor.shape != target_ids.shape:
        raise ValueError(f"{name} must have the shape of target_ids {tuple(target_ids.shape)}, got {tuple(tensor.shape)}")
    _check_same(name, tensor, "target_ids", target_ids, dtype=False)


def _validate(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs, teacher_lm_head_weight,
              token_weights, ignore_index, temperature, signal_clip) -> None:
    _check_float("student_hidden", student_hidden)
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must be (..., d), got shape {tuple(student_hidden.shape)}")
    _check_float("lm_head_weight", lm_head_weight, ndim=2)
    _check_same("lm_head_weight", lm_head_weight, "student_hidden", student_hidden, dtype=True)
    vocab_size, hidden_dim = lm_head_weight.shape
    if student_hidden.shape[-1] != hidden_dim:
        raise ValueError(f"student_hidden has hidden size {student_hidden.shape[-1]} but lm_head_weight is "
                         f"{tuple(lm_head_weight.shape)} (V, d)")
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if target_ids.shape != student_hidden.shape[:-1]:
        raise ValueError(f"target_ids must have shape {tuple(student_hidden.shape[:-1])} (student_hidden without "
                         f"its last dim), got {tuple(target_ids.shape)}")
    _check_same("target_ids", target_ids, "student_hidden", student_hidden, dtype=False)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    bad = (target_ids != ignore_index) & ((target_ids < 0) | (target_ids >= vocab_size))
    if bool(bad.any()):
        value = int(target_ids[bad][0])
        raise ValueError(f"target_ids contains {value}, outside [0, {vocab_size}) and not ignore_index={ignore_index}")

    if (teacher_hidden is None) == (teacher_logprobs is None):
        raise ValueError("pass exactly one of teacher_hidden or teacher_logprobs")
    if teacher_hidden is not None:
        _check_float("teacher_hidden", teacher_hidden)
        if teacher_hidden.shape[:-1] != target_ids.shape:
            raise ValueError(f"teacher_hidden must have shape {tuple(target_ids.shape)} + (d,), "
                             f"got {tuple(teacher_hidden.shape)}")
        teacher_weight, weight_name = lm_head_weight, "lm_head_weight"
        if teacher_lm_head_weight is not None:
            _check_float("teacher_lm_head_weight", teacher_lm_head_weight, ndim=2)
            if teacher_lm_head_weight.shape[0] != vocab_size:
                raise ValueError(f"teacher_lm_head_weight has vocabulary {teacher_lm_head_weight.shape[0]} but "
                                 f"lm_head_weight has {vocab_size}")
            teacher_weight, weight_name = teacher_lm_head_weight, "teacher_lm_head_weight"
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but {weight_name} is "
                             f"{tuple(teacher_weight.shape)}")
        _check_same("teacher_hidden", teacher_hidden, weight_name, teacher_weight, dtype=True)
    else:
        if teacher_lm_head_weight is not None:
            raise ValueError("teacher_lm_head_weight is only used with teacher_hidden, not with teacher_logprobs")
        _check_per_token("teacher_logprobs", teacher_logprobs, target_ids)
    if token_weights is not None:
        _check_per_token("token_weights", token_weights, target_ids)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if signal_clip is not None and (isinstance(signal_clip, bool) or not isinstance(signal_clip, (int, float))
                                    or not signal_clip > 0):
        raise ValueError(f"signal_clip must be None or a number > 0, got {signal_clip!r}")


def _ops(backend: str):
    if backend == "triton":
        from . import ops_triton
        return ops_triton
    return ops_torch


def sdpo_loss(student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
              teacher_lm_head_weight=None, token_weights=None, ignore_index=-100, temperature=1.0,
              signal_clip=None, backend="auto", return_stats=False):
    """SDPO loss  sum_t w_t * -(A_t * log pi(y_t)),  A_t = clip(log q(y_t) - log pi(y_t)) held constant.

    student_hidden (..., d) and lm_head_weight (V, d): one float dtype; target_ids (...) integer, ignore_index
    marks non-loss tokens. The teacher is teacher_hidden (..., d_t) with teacher_lm_head_weight (V, d_t)
    (default lm_head_weight), or teacher_logprobs (...). token_weights (...) replaces the default weights
    1/(number of loss tokens). Returns a 0-dim fp32 loss, or (loss, SDPOStats) with return_stats=True.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton", "torch", or "reference".
    """
    _validate(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs, teacher_lm_head_weight,
              token_weights, ignore_index, temperature, signal_clip)
    backend = _resolve_backend(backend, student_hidden.device)
    if backend == "reference":
        loss, stats = reference_sdpo_loss(
            student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
            teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
            token_weights=token_weights, ignore_index=ignore_index, temperature=temperature, signal_clip=signal_clip)
        return (loss, SDPOStats(*stats)) if return_stats else loss

    ops = _ops(backend)
    inv_temperature = 1.0 / float(temperature)
    targets = target_ids.reshape(-1)
    loss_mask = targets != ignore_index
    rows = loss_mask.nonzero().squeeze(1)
    every_row = rows.numel() == targets.numel()

    def loss_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if every_row else tensor.index_select(0, rows)

    hidden = loss_rows(student_hidden.reshape(-1, student_hidden.shape[-1]))
    loss_targets = loss_rows(targets).long().contiguous()
    if token_weights is None:
        weights = torch.full((rows.numel(),), 1.0 / max(rows.numel(), 1), device=targets.device)
    else:
        weights = loss_rows(token_weights.reshape(-1)).float()
    if teacher_logprobs is not None:
        teacher_lp = loss_rows(teacher_logprobs.reshape(-1)).float()
    else:
        weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
        with torch.no_grad():
            teacher_rows = loss_rows(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
            teacher_lp, _ = ops.token_logprobs(teacher_rows, weight, loss_targets, inv_temperature)

    loss, student_lp, advantages = SDPOFunction.apply(
        hidden, lm_head_weight, loss_targets, teacher_lp, weights, ops, inv_temperature, signal_clip)
    if not return_stats:
        return loss

    def full(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        out[rows] = values.detach()
        return out.reshape(target_ids.shape)

    return loss, SDPOStats(full(student_lp), full(teacher_lp), full(advantages))


class SDPOLoss(torch.nn.Module):
    """`sdpo_loss` as a module; constructor takes the keyword options, forward the tensors."""

    def __init__(self, *, ignore_index=-100, temperature=1.0, signal_clip=None, backend="auto", return_stats=False):
        super().__init__()
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.signal_clip = signal_clip
        self.backend = backend
        self.return_stats = return_stats

    def forward(self, student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
                teacher_lm_head_weight=None, token_weights=None):
        return sdpo_loss(student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
                         teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
                         token_weights=token_weights, ignore_index=self.ignore_index, temperature=self.temperature,
                         signal_clip=self.signal_clip, backend=self.backend, return_stats=self.return_stats)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"signal_clip={self.signal_clip}, backend={self.backend!r}")
