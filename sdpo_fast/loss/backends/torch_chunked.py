"""Chunked PyTorch backend: per-token log-probs and the advantage-weighted gradient without an (N, V) buffer.

Tokens are processed in chunks whose fp32 logits fit one reused buffer of `SDPO_FAST_TORCH_CHUNK_MB` (default
64 MiB; larger chunks make fewer passes over the fp32 grad_weight). `logprobs_and_grad` forms the gradient in
the same sweep as the student's log-probs; `grad` recomputes the chunk's softmax exactly as that sweep does, so
both give bit-identical gradients for the same coefficients.
"""
from __future__ import annotations

import os

import torch

from .chunked_divergence import divergence_sweep


def _budget_bytes() -> int:
    return int(os.environ.get("SDPO_FAST_TORCH_CHUNK_MB", "64")) << 20


def _chunks(n_tokens: int, vocab_size: int, device: torch.device):
    """Row slices whose fp32 logits fit the budget, and one reusable (rows, V) fp32 buffer for them."""
    rows = min(max(1, _budget_bytes() // (4 * vocab_size)), max(n_tokens, 1))
    buffer = torch.empty((rows, vocab_size), dtype=torch.float32, device=device)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        yield slice(start, stop), buffer[: stop - start]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float, out: torch.Tensor) -> torch.Tensor:
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight.T, out=out)
    else:
        out.copy_(hidden @ weight.T)
    return out.mul_(inv_temperature)


def _softmax_parts(hidden, weight, targets, inv_temperature: float, buffer: torch.Tensor):
    """One chunk: exp(z - max) (n, V) fp32 (in `buffer`), its row sums (n,) fp64, and the target log-probs
    (n,) fp32. Row sums are fp64: an fp32 sum over a 10^5-word vocabulary loses ~1e-5 of relative precision.
    """
    logits = _logits(hidden, weight, inv_temperature, buffer)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.max(dim=1, keepdim=True).values.squeeze(1)
    exp = logits.sub_(row_max[:, None]).exp_()
    sums = exp.sum(dim=1, dtype=torch.float64)
    return exp, sums, (target_logit - row_max - sums.log()).float()


class TorchBackend:
    """The chunked PyTorch backend (CPU default; any device)."""

    name = "torch"
    grad_in_forward = True

    def token_logprobs(self, hidden, weight, targets, inv_temperature: float):
        n_tokens = hidden.shape[0]
        logprobs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        for rows, buffer in _chunks(n_tokens, weight.shape[0], hidden.device):
            _, _, logprobs[rows] = _softmax_parts(hidden[rows], weight, targets[rows], inv_temperature, buffer)
        return logprobs, None

    def grad(self, hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool,
             need_weight: bool, grad_weight_dtype: torch.dtype = torch.float32):
        _, grad_hidden, grad_weight = self.logprobs_and_grad(
            hidden, weight, targets, inv_temperature, lambda rows, _: coef[rows], need_hidden, need_weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(grad_weight_dtype)

    def logprobs_and_grad(self, hidden, weight, targets, inv_temperature: float, coef_of, need_hidden: bool,
                          need_weight: bool):
        n_tokens = hidden.shape[0]
        logprobs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for rows, buffer in _chunks(n_tokens, weight.shape[0], hidden.device):
            exp, sums, logprobs[rows] = _softmax_parts(hidden[rows], weight, targets[rows], inv_temperature, buffer)
            probs = exp.div_(sums.float()[:, None])
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
            grad_logits = probs.mul_((coef_of(rows, logprobs[rows]) * inv_temperature)[:, None])
            if need_hidden:
                grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[rows].float())
        return logprobs, grad_hidden, grad_weight

    def divergence(self, hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec,
                   inv_temperature: float, need_hidden: bool, need_weight: bool):
        """See `chunked_divergence.divergence_sweep`; workspace within SDPO_FAST_TORCH_CHUNK_MB."""
        return divergence_sweep(
            hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec, inv_temperature, need_hidden,
            need_weight, budget_bytes=_budget_bytes(), logits_into=_logits,
            add_grad_weight=lambda grad, rows_hidden, out: out.addmm_(grad.T, rows_hidden.float()))
