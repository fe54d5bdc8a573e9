"""`sdpo_loss`: the SDPO loss and its distillation variants computed straight from hidden states and the lm_head
weight."""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from ..utils.checks import check_bool, check_int
from .backends import get_backend, resolve_backend
from .backends.gemm_sweep import logprobs_sweep
from .divergence import DivergenceSpec
from .function import DivergenceFunction, LossParams, SDPOFunction
from .head import head_hidden, head_inv_temperature, head_softcap, head_weight
from .reference import reference_sdpo_loss
from .stats import SDPOStats
from .validation import validate, validate_distillation, validate_head, validate_values


def autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype an enclosing `torch.autocast` asks for when hidden/weight are fp32, else None."""
    kind = hidden.device.type
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def sdpo_loss(student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
              teacher_lm_head_weight=None, token_weights=None, ignore_index=IGNORE_INDEX, temperature=1.0,
              signal_clip=None, center_advantages=False, sequence_index=None, distillation_mode="sampled_token",
              distillation_alpha=1.0, distillation_topk=100, distillation_add_tail=True, behavior_logprobs=None,
              importance_clip=None, backend="auto", return_stats=False, check_values=True, compact=True,
              check_finite=True, lm_head_bias=None, logit_scale=1.0, logit_softcap=None, teacher_lm_head_bias=None,
              teacher_logit_scale=1.0, teacher_logit_softcap=None, grad_in_forward=None, workspace_bytes=None):
    """SDPO loss  sum_t w_t * c_t * D_t  over the loss tokens.

    D_t by distillation_mode: "sampled_token" -A_t * log pi(y_t) with A_t = clip(log q(y_t) - log pi(y_t)) held
    constant; "full_logits" the alpha-divergence (distillation_alpha: 0 forward KL, 1 reverse KL, between them
    the mixture form, 0.5 the JSD) of the student from the teacher over the vocabulary; "topk_logits" the same
    over the student's distillation_topk most likely tokens, with a tail bucket for the remaining mass
    (distillation_add_tail) or renormalized. c_t = min(exp(log pi(y_t) - log mu(y_t)), importance_clip) held
    constant when behavior_logprobs (log mu (...), the sampler's) and importance_clip are given, else 1.
    Definitions as TRL's `trl.experimental.sdpo.loss_utils`; the teacher is never differentiated.

    student_hidden (..., d) and lm_head_weight (V, d): one float dtype; target_ids (...) integer, ignore_index
    marks non-loss tokens. The teacher is teacher_hidden (..., d_t) with teacher_lm_head_weight (V, d_t)
    (default lm_head_weight), or teacher_logprobs (...). token_weights (...) replaces the default weights
    1/(number of loss tokens). center_advantages: A_t minus its mean over the loss tokens of its sequence
    (sequence_index (...), integer ids in [0, number of positions)), before the clip, in the same pass.
    teacher_logprobs and signal_clip/center_advantages serve sampled_token only (which needs alpha = 1).
    Returns a 0-dim fp32 loss, or (loss, SDPOStats) with return_stats=True. Under `torch.autocast` with fp32
    inputs, sampled_token's products run in the autocast dtype (tensor cores) with fp32 accumulation.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton", "torch", or "reference". The full and
    top-k modes run over token chunks whose fp32 (chunk, V) workspace (8 buffers) stays within
    SDPO_FAST_TORCH_CHUNK_MB (64) or SDPO_FAST_TRITON_WORKSPACE_MB (256); only "reference" forms (N, V) logits.
    The logits are softcap(logit_scale * (h @ lm_head_weight.T + lm_head_bias)) / temperature with softcap(z) =
    logit_softcap * tanh(z / logit_softcap) (lm_head_bias (V,) in the weight's dtype, or None; logit_softcap None:
    no cap), as the model forms them; gradients flow through all of it (lm_head_bias gets one when it requires
    grad). A teacher with its own head (teacher_lm_head_weight) has its own teacher_lm_head_bias,
    teacher_logit_scale and teacher_logit_softcap; otherwise it uses the student's head.
    Values (check_values=True): target and sequence ids in range, token_weights >= 0 and teacher_logprobs <= 0
    at loss positions, and with check_finite every float input finite (ValueError naming the tensor). compact:
    drop ignored positions before the vocabulary sweep. Value checks and compaction read device values (one host
    sync each on a GPU); with check_values=False and compact=False the call queues its work without waiting
    (inputs must then be valid; ignored positions are computed with weight 0). No loss tokens: loss 0.0 and zero
    gradients on every backend.
    grad_in_forward: True forms the gradients in the forward (`backends.gemm_sweep`: per chunk of rows, logits by
    GEMMs into a workspace, one row pass (Triton kernels on the Triton backend) writing d(loss)/d(logits) in place,
    then dX and dW by GEMMs; 8·N·d·V FLOPs with a teacher head, 10 with center_advantages); False the recompute
    path (sampled_token: logits never written, recomputed tile by tile in the backward, 10·N·d·V; the logit modes:
    the backend's fp32 chunk sweep); None picks True when a chunk of min(1024, N) rows fits workspace_bytes.
    workspace_bytes: that budget in bytes (None: SDPO_FAST_TORCH_CHUNK_MB or SDPO_FAST_TRITON_WORKSPACE_MB).
    Forward-only calls (no grad mode, or nothing requiring grad) form no gradients on either path.
    """
    validate(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs, teacher_lm_head_weight,
             token_weights, ignore_index, temperature, signal_clip, sequence_index, center_advantages)
    validate_distillation(target_ids, lm_head_weight.shape[0], teacher_hidden, teacher_logprobs, signal_clip,
                          center_advantages, distillation_mode, distillation_alpha, distillation_topk,
                          distillation_add_tail, behavior_logprobs, importance_clip)
    validate_head(lm_head_weight, lm_head_bias, logit_scale, logit_softcap, teacher_lm_head_weight,
                  teacher_lm_head_bias, teacher_logit_scale, teacher_logit_softcap)
    check_bool("check_values", check_values)
    check_bool("compact", compact)
    check_bool("check_finite", check_finite)
    if grad_in_forward is not None:
        check_bool("grad_in_forward", grad_in_forward)
    check_int("workspace_bytes", workspace_bytes, 0, optional=True)
    if check_values:
        validate_values(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs,
                        teacher_lm_head_weight, token_weights, ignore_index, sequence_index, check_finite,
                        behavior_logprobs, lm_head_bias=lm_head_bias, teacher_lm_head_bias=teacher_lm_head_bias)
    backend = resolve_backend(backend, student_hidden.device)
    targets = target_ids.reshape(-1)
    loss_mask = targets != ignore_index
    if compact:  # one read of the loss positions serves both the empty case and the compaction
        rows = loss_mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            return _no_loss_tokens(student_hidden, lm_head_weight, lm_head_bias, target_ids, return_stats)
        every_row = rows.numel() == targets.numel()
    else:
        rows, every_row = None, True
    if backend == "reference":
        loss, stats = reference_sdpo_loss(
            student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
            teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
            token_weights=token_weights, ignore_index=ignore_index, temperature=temperature, signal_clip=signal_clip,
            center_advantages=center_advantages, sequence_index=sequence_index, distillation_mode=distillation_mode,
            distillation_alpha=distillation_alpha, distillation_topk=distillation_topk,
            distillation_add_tail=distillation_add_tail, behavior_logprobs=behavior_logprobs,
            importance_clip=importance_clip, lm_head_bias=lm_head_bias, logit_scale=logit_scale,
            logit_softcap=logit_softcap, teacher_lm_head_bias=teacher_lm_head_bias,
            teacher_logit_scale=teacher_logit_scale, teacher_logit_softcap=teacher_logit_softcap)
        return (loss, stats) if return_stats else loss

    ops = get_backend(backend)
    spec = None if distillation_mode == "sampled_token" else DivergenceSpec(
        distillation_mode, float(distillation_alpha), distillation_topk, distillation_add_tail)
    compute_dtype = autocast_dtype(student_hidden, lm_head_weight) if spec is None else None
    budget = ops.default_workspace_bytes() if workspace_bytes is None else workspace_bytes
    n_rows = rows.numel() if compact else targets.numel()
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or lm_head_weight.requires_grad
                                             or (lm_head_bias is not None and lm_head_bias.requires_grad))
    grad_in_forward = choose_grad_in_forward(
        ops.row_ops, grad_in_forward, budget, n_rows, distillation_mode, compute_dtype or student_hidden.dtype,
        lm_head_weight.shape[0], distillation_topk if spec is not None else 0, need_grad, logit_softcap is not None)
    own_head = teacher_lm_head_weight is not None
    if own_head:
        teacher_bias, teacher_scale, teacher_softcap = teacher_lm_head_bias, teacher_logit_scale, teacher_logit_softcap
    else:
        teacher_bias, teacher_scale, teacher_softcap = lm_head_bias, logit_scale, logit_softcap
    params = LossParams(ops, head_inv_temperature(1.0 / float(temperature), logit_scale),
                        signal_clip=signal_clip, center=center_advantages, compute_dtype=compute_dtype,
                        importance_clip=importance_clip, divergence=spec,
                        softcap=head_softcap(logit_scale, logit_softcap),
                        teacher_inv_temperature=head_inv_temperature(1.0 / float(temperature), teacher_scale),
                        teacher_softcap=head_softcap(teacher_scale, teacher_softcap),
                        grad_in_forward=grad_in_forward, workspace_bytes=budget)

    def loss_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if every_row else tensor.index_select(0, rows)

    def full(values: torch.Tensor) -> torch.Tensor:
        if not compact:
            return values.detach().masked_fill(~loss_mask, 0.0).reshape(target_ids.shape)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        out[rows] = values.detach()
        return out.reshape(target_ids.shape)

    hidden = head_hidden(loss_rows(student_hidden.reshape(-1, student_hidden.shape[-1])), lm_head_bias is not None)
    weight = head_weight(lm_head_weight, lm_head_bias)
    if not need_grad:  # the autograd functions then see no input needing a gradient, and form none
        hidden, weight = hidden.detach(), weight.detach()
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
    behavior_lp = None if behavior_logprobs is None else loss_rows(behavior_logprobs.reshape(-1)).float()
    teacher_weight = head_weight(teacher_lm_head_weight, teacher_bias) if own_head else weight

    def teacher_head_rows() -> torch.Tensor:
        rows = loss_rows(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
        return head_hidden(rows, teacher_bias is not None)

    if spec is not None:
        loss, divergence, student_lp, teacher_lp = DivergenceFunction.apply(
            hidden, weight, teacher_head_rows(), teacher_weight, loss_targets, weights, behavior_lp, params)
        if not return_stats:
            return loss
        return loss, SDPOStats(full(student_lp), full(teacher_lp), full(teacher_lp - student_lp), full(divergence))

    if teacher_logprobs is not None:
        teacher_lp = loss_rows(teacher_logprobs.reshape(-1)).float()
    else:
        with torch.no_grad():
            teacher_rows, teacher_weight = teacher_head_rows(), teacher_weight.detach()
            if compute_dtype is not None:
                teacher_rows, teacher_weight = teacher_rows.to(compute_dtype), teacher_weight.to(compute_dtype)
            if grad_in_forward:
                teacher_lp = logprobs_sweep(ops.row_ops, teacher_rows, teacher_weight, loss_targets,
                                            params.teacher_inv_temperature, budget_bytes=budget,
                                            softcap=params.teacher_softcap)
            else:
                teacher_lp, _ = ops.token_logprobs(teacher_rows, teacher_weight, loss_targets,
                                                   params.teacher_inv_temperature, params.teacher_softcap)
    sequences = None
    if center_advantages:  # uncompacted ignored positions are centred in a slot of their own, left unused
        sequences = loss_rows(sequence_index.reshape(-1)).long()
        if not compact:
            sequences = sequences.masked_fill(~loss_mask, targets.numel())

    loss, student_lp, advantages = SDPOFunction.apply(
        hidden, weight, loss_targets, teacher_lp, weights, sequences, behavior_lp, params,
        targets.numel() + 1)
    if not return_stats:
        return loss
    return loss, SDPOStats(full(student_lp), full(teacher_lp), full(advantages), full(-advantages * student_lp))


GRAD_IN_FORWARD_MIN_ROWS = 1024
"""grad_in_forward=None picks the grad-in-forward path when a chunk of this many rows (or all of them) fits."""


def choose_grad_in_forward(row_ops, grad_in_forward: bool | None, budget_bytes: int, n_rows: int, mode: str,
                           dtype: torch.dtype, vocab_size: int, topk: int, need_grad: bool, softcap: bool) -> bool:
    """The path a call takes: grad_in_forward itself when given (ValueError when True and not one row fits the
    budget), else True when min(GRAD_IN_FORWARD_MIN_ROWS, n_rows) rows fit budget_bytes. The planner asks the same."""
    rows = budget_bytes // row_ops.bytes_per_row(mode, dtype, vocab_size, topk, need_grad, softcap)
    if grad_in_forward is None:
        return rows >= min(GRAD_IN_FORWARD_MIN_ROWS, max(n_rows, 1))
    if grad_in_forward and rows < 1:
        raise ValueError(f"workspace_bytes={budget_bytes} holds no row of the grad-in-forward path (one needs "
                         f"{row_ops.bytes_per_row(mode, dtype, vocab_size, topk, need_grad, softcap)} bytes); raise "
                         "workspace_bytes or pass grad_in_forward=False")
    return grad_in_forward


def _no_loss_tokens(student_hidden, lm_head_weight, lm_head_bias, target_ids, return_stats):
    """Loss +0.0 (fp32, in the graph of the inputs, so their gradients are zeros) and zero stats."""
    loss = (student_hidden.reshape(-1)[:0].float().sum() + lm_head_weight.reshape(-1)[:0].float().sum())
    if lm_head_bias is not None:
        loss = loss + lm_head_bias[:0].float().sum()
    if not return_stats:
        return loss
    zeros = torch.zeros(target_ids.shape, dtype=torch.float32, device=target_ids.device)
    return loss, SDPOStats(zeros, zeros.clone(), zeros.clone(), zeros.clone())


class SDPOLoss(torch.nn.Module):
    """`sdpo_loss` as a module; constructor takes the keyword options, forward the tensors."""

    def __init__(self, *, ignore_index=IGNORE_INDEX, temperature=1.0, signal_clip=None, center_advantages=False,
                 distillation_mode="sampled_token", distillation_alpha=1.0, distillation_topk=100,
                 distillation_add_tail=True, importance_clip=None, backend="auto", return_stats=False,
                 check_finite=True, logit_scale=1.0, logit_softcap=None, teacher_logit_scale=1.0,
                 teacher_logit_softcap=None, grad_in_forward=None, workspace_bytes=None):
        super().__init__()
        self.grad_in_forward, self.workspace_bytes = grad_in_forward, workspace_bytes
        self.logit_scale, self.logit_softcap = logit_scale, logit_softcap
        self.teacher_logit_scale, self.teacher_logit_softcap = teacher_logit_scale, teacher_logit_softcap
        self.ignore_index, self.temperature, self.signal_clip = ignore_index, temperature, signal_clip
        self.center_advantages, self.backend, self.return_stats = center_advantages, backend, return_stats
        self.distillation_mode, self.distillation_alpha = distillation_mode, distillation_alpha
        self.distillation_topk, self.distillation_add_tail = distillation_topk, distillation_add_tail
        self.importance_clip, self.check_finite = importance_clip, check_finite

    def forward(self, student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
                teacher_lm_head_weight=None, token_weights=None, sequence_index=None, behavior_logprobs=None,
                lm_head_bias=None, teacher_lm_head_bias=None):
        return sdpo_loss(student_hidden, lm_head_weight, target_ids, teacher_hidden=teacher_hidden,
                         teacher_logprobs=teacher_logprobs, teacher_lm_head_weight=teacher_lm_head_weight,
                         token_weights=token_weights, ignore_index=self.ignore_index, temperature=self.temperature,
                         signal_clip=self.signal_clip, center_advantages=self.center_advantages,
                         sequence_index=sequence_index, distillation_mode=self.distillation_mode,
                         distillation_alpha=self.distillation_alpha, distillation_topk=self.distillation_topk,
                         distillation_add_tail=self.distillation_add_tail, behavior_logprobs=behavior_logprobs,
                         importance_clip=self.importance_clip, backend=self.backend, return_stats=self.return_stats,
                         check_finite=self.check_finite, lm_head_bias=lm_head_bias, logit_scale=self.logit_scale,
                         logit_softcap=self.logit_softcap, teacher_lm_head_bias=teacher_lm_head_bias,
                         teacher_logit_scale=self.teacher_logit_scale,
                         teacher_logit_softcap=self.teacher_logit_softcap, grad_in_forward=self.grad_in_forward,
                         workspace_bytes=self.workspace_bytes)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"signal_clip={self.signal_clip}, center_advantages={self.center_advantages}, "
                f"distillation_mode={self.distillation_mode!r}, distillation_alpha={self.distillation_alpha}, "
                f"distillation_topk={self.distillation_topk}, distillation_add_tail={self.distillation_add_tail}, "
                f"importance_clip={self.importance_clip}, backend={self.backend!r}, logit_scale={self.logit_scale}, "
                f"logit_softcap={self.logit_softcap}, grad_in_forward={self.grad_in_forward}, "
                f"workspace_bytes={self.workspace_bytes}")
