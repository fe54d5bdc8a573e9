"""The SDPO loss as one autograd function over a backend, configured by one `LossParams`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import LossBackend
from .backends.gemm_sweep import divergence_grad_sweep, logprobs_sweep, token_grad_sweep
from .divergence import DivergenceSpec, importance_ratio


@dataclass(frozen=True)
class LossParams:
    """Everything `SDPOFunction` needs besides tensors.

    inv_temperature: 1/T of the log-probs (times the logit scale, `loss.head`). softcap: the student
    logits are softcap * tanh(hidden @ weight.T / softcap) * inv_temperature (None: no cap; `loss.head`); the
    teacher's, with teacher_softcap and teacher_inv_temperature (None: inv_temperature).
    signal_clip: advantages clamped to +-signal_clip (None: off).
    center: advantages mean-centred over each sequence's loss tokens before the clip.
    compute_dtype: the dtype hidden and weight are cast to for the products (an autocast dtype), or None to keep
    theirs; gradients come back in the inputs' own dtypes, grad_weight accumulated in fp32.
    importance_clip: the per-token loss times min(exp(log pi(y) - log mu(y)), importance_clip), held constant,
    when set and behavior log-probs are passed. divergence: the distillation mode's spec (None: sampled_token).
    grad_in_forward: the grad-in-forward path (`backends.gemm_sweep`, its workspace within workspace_bytes), else
    the recompute path (sampled_token) or the backend's own `divergence` sweep (the logit modes).
    """

    backend: LossBackend
    inv_temperature: float
    signal_clip: float | None = None
    center: bool = False
    compute_dtype: torch.dtype | None = None
    importance_clip: float | None = None
    divergence: DivergenceSpec | None = None
    softcap: float | None = None
    teacher_inv_temperature: float | None = None
    teacher_softcap: float | None = None
    grad_in_forward: bool = False
    workspace_bytes: int = 0


def _importance(params: LossParams, behavior_logprobs, rows, student_logprobs):
    """c_t of the rows (or None when importance clipping is off)."""
    if params.importance_clip is None or behavior_logprobs is None:
        return None
    return importance_ratio(student_logprobs, behavior_logprobs[rows], params.importance_clip)


def advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, signal_clip) -> torch.Tensor:
    """A = log q - log pi, clamped to +-signal_clip when set; (n,) fp32."""
    advantage = teacher_logprobs - student_logprobs
    return advantage if signal_clip is None else advantage.clamp(-signal_clip, signal_clip)


def centered_teacher_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                              sequence_index: torch.Tensor, n_slots: int) -> torch.Tensor:
    """log q - mean_seq(log q - log pi) (all (n,) fp32, detached; sequence_index (n,) int64 < n_slots).

    A per-sequence constant shift of log q shifts A = log q - log pi by the same constant, so the advantages
    formed from the result are mean-centred per sequence.
    """
    raw = teacher_logprobs - student_logprobs
    sums = torch.zeros(n_slots, device=raw.device).index_add_(0, sequence_index, raw)
    counts = torch.zeros(n_slots, device=raw.device).index_add_(0, sequence_index, torch.ones_like(raw))
    return teacher_logprobs - (sums / counts.clamp(min=1))[sequence_index]


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad (fp32, saved by this backward's own forward) times the 0-dim fp32 scale, in `dtype`, rounded once:
    in place when dtype is grad's, else written straight into the `dtype` result (no scaled fp32 copy)."""
    if grad.dtype == dtype:
        return grad.mul_(scale)
    return torch.mul(grad, scale, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


class SDPOFunction(torch.autograd.Function):
    """loss = -sum_n w_n * A_n * log pi_n with A_n (clipped, optionally centred log q_n - log pi_n) held constant.

    Inputs: hidden (N, d), weight (V, d), targets (N,) int64 in [0, V), teacher_logprobs and weights (N,) fp32,
    sequence_index (N,) int64 (read only when params.center; values < n_slots), behavior_logprobs (N,) fp32 or
    None (with params.importance_clip, each token's term is also times its importance ratio) and params.
    Outputs: loss () fp32, student log-probs (N,) fp32, advantages (N,) fp32 (the last two not differentiable).
    With params.grad_in_forward the gradients are formed in the forward sweep (`gemm_sweep.token_grad_sweep`;
    centring runs the student's log-probs first, one more GEMM); otherwise the backward recomputes logits tiles from
    what the forward saved. grad_weight is formed in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_logprobs, weights, sequence_index, behavior_logprobs,
                params: LossParams, n_slots: int):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        backend = params.backend
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if params.compute_dtype is not None:
            hidden, weight = hidden.to(params.compute_dtype), weight.to(params.compute_dtype)
        ctx.grads_ready = params.grad_in_forward
        if params.grad_in_forward:
            ops = backend.row_ops
            if params.center:
                student_logprobs = logprobs_sweep(ops, hidden, weight, targets, params.inv_temperature,
                                                  budget_bytes=params.workspace_bytes, softcap=params.softcap)
                teacher_logprobs = centered_teacher_logprobs(teacher_logprobs, student_logprobs, sequence_index,
                                                             n_slots)
            student_logprobs, coef, grad_hidden, grad_weight = token_grad_sweep(
                ops, hidden, weight, targets, teacher_logprobs, weights, behavior_logprobs, params.inv_temperature,
                need_hidden, need_weight, budget_bytes=params.workspace_bytes, softcap=params.softcap,
                signal_clip=params.signal_clip, importance_clip=params.importance_clip)
            advantage = advantages(teacher_logprobs, student_logprobs, params.signal_clip)
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            student_logprobs, lse = backend.token_logprobs(hidden, weight, targets, params.inv_temperature,
                                                           params.softcap)
            if params.center:
                teacher_logprobs = centered_teacher_logprobs(teacher_logprobs, student_logprobs, sequence_index,
                                                             n_slots)
            advantage = advantages(teacher_logprobs, student_logprobs, params.signal_clip)
            coef = weights * advantage
            ratio = _importance(params, behavior_logprobs, slice(None), student_logprobs)
            if ratio is not None:
                coef = coef * ratio
            ctx.save_for_backward(hidden, weight, targets, lse, coef)
            ctx.params = params
        loss = -(coef * student_logprobs).sum()
        ctx.mark_non_differentiable(student_logprobs, advantage)
        return loss, student_logprobs, advantage

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_advantages):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if ctx.grads_ready:
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_loss.float()
            grad_hidden = (grad_hidden.float() * scale) if need_hidden else None
            grad_weight = _scaled(grad_weight, scale, ctx.weight_dtype) if need_weight else None
        else:
            hidden, weight, targets, lse, coef = ctx.saved_tensors
            grad_hidden, grad_weight = ctx.params.backend.grad(
                hidden, weight, targets, lse, coef * grad_loss.float(), ctx.params.inv_temperature, need_hidden,
                need_weight, grad_weight_dtype=ctx.weight_dtype, softcap=ctx.params.softcap)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


class DivergenceFunction(torch.autograd.Function):
    """loss = sum_n w_n * c_n * D_n, D_n the divergence of params.divergence between student and teacher (teacher
    detached), c_n the importance ratio (1 without behavior log-probs or params.importance_clip).

    Inputs: hidden (N, d), weight (V, d), teacher_hidden (N, d_t), teacher_weight (V, d_t), targets (N,) int64,
    weights (N,) fp32, behavior_logprobs (N,) fp32 or None, params. Outputs: loss () fp32; divergence, student and
    teacher log-probs at the targets, (N,) fp32 each (not differentiable). Gradients are formed in the forward
    sweep (`gemm_sweep.divergence_grad_sweep` with params.grad_in_forward, else the backend's `divergence`);
    grad_weight in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, weights, behavior_logprobs,
                params: LossParams):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype

        if params.grad_in_forward:
            divergence, student_lp, teacher_lp, coef, grad_hidden, grad_weight = divergence_grad_sweep(
                params.backend.row_ops, hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets,
                weights, behavior_logprobs, params.divergence, params.inv_temperature, need_hidden, need_weight,
                budget_bytes=params.workspace_bytes, softcap=params.softcap,
                teacher_inv_temperature=params.teacher_inv_temperature, teacher_softcap=params.teacher_softcap,
                importance_clip=params.importance_clip)
            loss = (coef * divergence).sum()
        else:
            def coef_of(rows, student_lp):
                ratio = _importance(params, behavior_logprobs, rows, student_lp)
                return weights[rows] if ratio is None else weights[rows] * ratio

            divergence, student_lp, teacher_lp, grad_hidden, grad_weight = params.backend.divergence(
                hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets, coef_of,
                params.divergence, params.inv_temperature, need_hidden, need_weight, softcap=params.softcap,
                teacher_inv_temperature=params.teacher_inv_temperature, teacher_softcap=params.teacher_softcap)
            loss = (coef_of(slice(None), student_lp) * divergence).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(divergence, student_lp, teacher_lp)
        return loss, divergence, student_lp, teacher_lp

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()
        grad_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype) if need_hidden else None
        grad_weight = _scaled(grad_weight, scale, ctx.weight_dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None, None
