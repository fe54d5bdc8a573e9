"""The SDPO loss as an autograd function over one set of ops (chunked torch or Triton)."""
from __future__ import annotations

import torch


def advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, signal_clip) -> torch.Tensor:
    """A = log q - log pi, clamped to +-signal_clip when set; (n,) fp32."""
    advantage = teacher_logprobs - student_logprobs
    return advantage if signal_clip is None else advantage.clamp(-signal_clip, signal_clip)


class SDPOFunction(torch.autograd.Function):
    """loss = -sum_n w_n * A_n * log pi_n with A_n = clip(log q_n - log pi_n) held constant.

    Inputs: hidden (N, d), weight (V, d), targets (N,) int64 in [0, V), teacher_logprobs and weights (N,) fp32.
    Outputs: loss () fp32, student log-probs (N,) fp32, advantages (N,) fp32 (the last two not differentiable).
    Ops with `logprobs_and_grad` (torch) form the gradients during the forward sweep; the others (Triton)
    recompute logits tiles in the backward from the saved logsumexp. grad_weight comes from the ops in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_logprobs, weights, ops, inv_temperature, signal_clip):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        ctx.grads_ready = hasattr(ops, "logprobs_and_grad") and (need_hidden or need_weight)
        if ctx.grads_ready:
            def coef_of(rows, student_lp):
                return weights[rows] * advantages(teacher_logprobs[rows], student_lp, signal_clip)

            student_logprobs, grad_hidden, grad_weight = ops.logprobs_and_grad(
                hidden, weight, targets, inv_temperature, coef_of, need_hidden, need_weight)
        else:
            student_logprobs, lse = ops.token_logprobs(hidden, weight, targets, inv_temperature)
        advantage = advantages(teacher_logprobs, student_logprobs, signal_clip)
        coef = weights * advantage
        loss = -(coef * student_logprobs).sum()
        if ctx.grads_ready:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse, coef)
            ctx.ops = ops
            ctx.inv_temperature = inv_temperature
        ctx.mark_non_differentiable(student_logprobs, advantage)
        return loss, student_logprobs, advantage

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_advantages):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if ctx.grads_ready:
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_loss.float()
            grad_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype) if need_hidden else None
            grad_weight = grad_weight * scale if need_weight else None
        else:
            hidden, weight, targets, lse, coef = ctx.saved_tensors
            if hidden.shape[0] == 0:
                grad_hidden = torch.zeros_like(hidden) if need_hidden else None
                grad_weight = torch.zeros(weight.shape, device=weight.device) if need_weight else None
            else:
                grad_hidden, grad_weight = ctx.ops.grad(hidden, weight, targets, lse, coef * grad_loss.float(),
                                                        ctx.inv_temperature, need_hidden, need_weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
