"""The SDPO loss as an autograd function over one set of ops (chunked torch or Triton)."""
from __future__ import annotations

import torch


class SDPOFunction(torch.autograd.Function):
    """loss = -sum_n w_n * A_n * log pi_n with A_n = clip(log q_n - log pi_n) held constant.

    Inputs: hidden (N, d), weight (V, d), targets (N,) int64 in [0, V), teacher_logprobs and weights (N,) fp32.
    Outputs: loss () fp32, student log-probs (N,) fp32, advantages (N,) fp32 (the last two not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_logprobs, weights, ops, inv_temperature, signal_clip):
        student_logprobs, lse = ops.token_logprobs(hidden, weight, targets, inv_temperature)
        advantages = teacher_logprobs - student_logprobs
        if signal_clip is not None:
            advantages = advantages.clamp(-signal_clip, signal_clip)
        coef = weights * advantages
        loss = -(coef * student_logprobs).sum()
        ctx.save_for_backward(hidden, weight, targets, lse, coef)
        ctx.ops = ops
        ctx.inv_temperature = inv_temperature
        ctx.mark_non_differentiable(student_logprobs, advantages)
        return loss, student_logprobs, advantages

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_advantages):
        hidden, weight, targets, lse, coef = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if hidden.shape[0] == 0:
            grad_hidden = torch.zeros_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight) if need_weight else None
        else:
            grad_hidden, grad_weight = ctx.ops.grad(
                hidden, weight, targets, lse, coef * grad_loss.float(), ctx.inv_temperature, need_hidden, need_weight
            )
        return grad_hidden, grad_weight, None, None, None, None, None, None
