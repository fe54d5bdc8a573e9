"""Chunked PyTorch ops: per-token log-probs and the advantage-weighted gradient without an (N, V) buffer.

Tokens are processed in chunks whose fp32 logits fit `SDPO_FAST_TORCH_CHUNK_MB` (default 32 MiB).
"""
from __future__ import annotations

import os

import torch


def _chunks(n_tokens: int, vocab_size: int):
    budget = int(os.environ.get("SDPO_FAST_TORCH_CHUNK_MB", "32")) << 20
    rows = max(1, budget // (4 * vocab_size))
    for start in range(0, n_tokens, rows):
        yield slice(start, min(start + rows, n_tokens))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    return (hidden @ weight.T).float().mul_(inv_temperature)


def token_logprobs(hidden, weight, targets, inv_temperature: float):
    """hidden (N, d), weight (V, d), targets (N,) int64 -> (logprobs, lse), each (N,) fp32."""
    n_tokens = hidden.shape[0]
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty_like(lse)
    for rows in _chunks(n_tokens, weight.shape[0]):
        logits = _logits(hidden[rows], weight, inv_temperature)
        target_logit[rows] = logits.gather(1, targets[rows, None]).squeeze(1)
        row_max = logits.max(dim=1, keepdim=True).values
        # fp64 row sums: an fp32 sum over a 10^5-word vocabulary loses ~1e-5 of relative precision.
        lse[rows] = (row_max.squeeze(1) + logits.sub_(row_max).exp_().sum(dim=1, dtype=torch.float64).log()).float()
    return target_logit - lse, lse


def grad(hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool, need_weight: bool):
    """Gradients of L = sum_n coef[n] * -log_softmax(z_n)[target_n], z = hidden @ weight.T * inv_temperature.

    coef (N,) fp32 (constant per token). Returns (grad_hidden (N, d) or None, grad_weight (V, d) or None);
    grad_weight is accumulated in fp32 and cast to weight's dtype at the end.
    """
    n_tokens = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    for rows in _chunks(n_tokens, weight.shape[0]):
        probs = _logits(hidden[rows], weight, inv_temperature).sub_(lse[rows, None]).exp_()
        probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
        grad_logits = probs.mul_((coef[rows] * inv_temperature)[:, None])
        if need_hidden:
            grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
        if need_weight:
            grad_weight.addmm_(grad_logits.T, hidden[rows].float())
    return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
