"""`sdpo_loss`: the SDPO policy-gradient loss computed straight from hidden states and the lm_head weight."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..constants import IGNORE_INDEX
from ..utils.checks import check_bool
from .backends import get_backend, resolve_backend
from .function import LossParams, SDPOFunction
from .reference import reference_sdpo_loss
from .validation import validate, validate_values


class SDPOStats(NamedTuple):
    """Per-token statistics, each shaped like target_ids, float32, detached, 0 at ignored positions.

    teacher_logprobs: log q as given or computed; advantages: the A_t the loss used (centred, clipped).
    """

    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor


def autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype an enclosing `torch.autocast` asks for when hidden/weight are fp32, else None."""
    kind = hidden.device.type
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def sdpo_loss(student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
              teacher_lm_head_weight=None, token_weights=None, ignore_index=IGNORE_INDEX, temperature=1.0,
              signal_clip=None, center_advantages=False, sequence_index=None, backend="auto", return_stats=False,
              check_values=True, compact=True, check_finite=True):
    """SDPO loss  sum_t w_t * -(A_t * log pi(y_t)),  A_t = clip(log q(y_t) - log pi(y_t)) held constant.

    student_hidden (..., d) and lm_head_weight (V, d): one float dtype; target_ids (...) integer, ignore_index
    marks non-loss tokens. The teacher is teacher_hidden (..., d_t) with teacher_lm_head_weight (V, d_t)
    (default lm_head_weight), or teacher_logprobs (...). token_weights (...) replaces the default weights
    1/(number of loss tokens). center_advantages: A_t minus its mean over the loss tokens of its sequence
    (sequence_index (...), integer ids in [0, number of positions)), before the clip, in the same pass.
    Returns a 0-dim fp32 loss, or (loss, SDPOStats) with return_stats=True. Under `torch.autocast` with fp32
    inputs, the products run in the autocast dtype (tensor cores) with fp32 accumulation; grads stay fp32.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton", "torch", or "reference".
    Values (check_values=True): target and sequence ids in range, temperature >= 1e-3, token_weights >= 0 and
    teacher_logprobs <= 0 at loss positions, and with check_finite every float input finite (ValueError naming the
    tensor). compact: drop ignored positions before the vocabulary sweep. Value checks and compaction read device
    values (one host sync each on a GPU); with check_values=False and compact=False the call queues its work
    without waiting (inputs must then be valid; ignored positions are computed with weight 0). No loss tokens:
    loss 0.0 and zero gradients on every backend.
    """
    validate(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs, teacher_lm_head_weight,
             token_weights, ignore_index, temperature, signal_clip, sequence_index, center_advantages)
    check_bool("check_finite", check_finite)
    if check_values:
        validate_values(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs,
                        teacher_lm_head_weight, token_weights, ignore_index, sequence_index, check_finite)
    backend = resolve_backend(backend, student_hidden.device)
    if compact and not bool((target_ids != ignore_index).any()):
        return _no_loss_tokens(student_hidden, lm_head_weight, target_ids, return_stats)
    if backend == "reference":
        loss, stats = reference_sdpo_loss(
            student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
            teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
            token_weights=token_weights, ignore_index=ignore_index, temperature=temperature, signal_clip=signal_clip,
            center_advantages=center_advantages, sequence_index=sequence_index)
        return (loss, SDPOStats(*stats)) if return_stats else loss

    ops = get_backend(backend)
    compute_dtype = autocast_dtype(student_hidden, lm_head_weight)
    params = LossParams(ops, 1.0 / float(temperature), signal_clip, center_advantages, compute_dtype)
    targets = target_ids.reshape(-1)
    loss_mask = targets != ignore_index
    if compact:
        rows = loss_mask.nonzero().squeeze(1)
        every_row = rows.numel() == targets.numel()
    else:
        rows, every_row = None, True

    def loss_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if every_row else tensor.index_select(0, rows)

    hidden = loss_rows(student_hidden.reshape(-1, student_hidden.shape[-1]))
    loss_targets = loss_rows(targets).long()
    if not compact:
        loss_targets = loss_targets.masked_fill(~loss_mask, 0)
    loss_targets = loss_targets.contiguous()
    if token_weights is None:
        weights = torch.full((rows.numel(),), 1.0 / max(rows.numel(), 1), device=targets.device) if compact \
            else loss_mask.float() / loss_mask.sum().clamp(min=1)
    else:
        weights = loss_rows(token_weights.reshape(-1)).float()
        if not compact:
            weights = weights.masked_fill(~loss_mask, 0.0)
    if teacher_logprobs is not None:
        teacher_lp = loss_rows(teacher_logprobs.reshape(-1)).float()
    else:
        weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
        with torch.no_grad():
            teacher_rows = loss_rows(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
            if compute_dtype is not None:
                teacher_rows, weight = teacher_rows.to(compute_dtype), weight.to(compute_dtype)
            teacher_lp, _ = ops.token_logprobs(teacher_rows, weight, loss_targets, params.inv_temperature)
    sequences = None
    if center_advantages:  # uncompacted ignored positions are centred in a slot of their own, left unused
        sequences = loss_rows(sequence_index.reshape(-1)).long()
        if not compact:
            sequences = sequences.masked_fill(~loss_mask, targets.numel())

    loss, student_lp, advantages = SDPOFunction.apply(
        hidden, lm_head_weight, loss_targets, teacher_lp, weights, sequences, params, targets.numel() + 1)
    if not return_stats:
        return loss

    def full(values: torch.Tensor) -> torch.Tensor:
        if not compact:
            return values.detach().masked_fill(~loss_mask, 0.0).reshape(target_ids.shape)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        out[rows] = values.detach()
        return out.reshape(target_ids.shape)

    return loss, SDPOStats(full(student_lp), full(teacher_lp), full(advantages))


def _no_loss_tokens(student_hidden, lm_head_weight, target_ids, return_stats):
    """Loss +0.0 (fp32, in the graph of both inputs, so their gradients are zeros) and zero stats."""
    loss = (student_hidden.reshape(-1)[:0].float().sum() + lm_head_weight.reshape(-1)[:0].float().sum())
    if not return_stats:
        return loss
    zeros = torch.zeros(target_ids.shape, dtype=torch.float32, device=target_ids.device)
    return loss, SDPOStats(zeros, zeros.clone(), zeros.clone())


class SDPOLoss(torch.nn.Module):
    """`sdpo_loss` as a module; constructor takes the keyword options, forward the tensors."""

    def __init__(self, *, ignore_index=IGNORE_INDEX, temperature=1.0, signal_clip=None, center_advantages=False,
                 backend="auto", return_stats=False, check_finite=True):
        super().__init__()
        self.check_finite = check_finite
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.signal_clip = signal_clip
        self.center_advantages = center_advantages
        self.backend = backend
        self.return_stats = return_stats

    def forward(self, student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
                teacher_lm_head_weight=None, token_weights=None, sequence_index=None):
        return sdpo_loss(student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
                         teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
                         token_weights=token_weights, ignore_index=self.ignore_index, temperature=self.temperature,
                         signal_clip=self.signal_clip, center_advantages=self.center_advantages,
                         sequence_index=sequence_index, backend=self.backend, return_stats=self.return_stats,
                         check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"signal_clip={self.signal_clip}, center_advantages={self.center_advantages}, "
                f"backend={self.backend!r}")
