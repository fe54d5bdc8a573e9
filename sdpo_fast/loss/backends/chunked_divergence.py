"""The distillation sweep both fast backends share: chunks of student and teacher logits, the divergence and its
gradient formed in the same pass (8·N·d·V FLOPs: two logits products, grad_hidden, grad_weight).

Workspace: `kernels.config.DIVERGENCE_BUFFERS` fp32 (rows, V) buffers at most (student and teacher logits plus the temporaries
of `chunk_divergence`), rows chosen so that they fit the backend's budget; never an (N, V) tensor.
"""
from __future__ import annotations

import torch

from ...kernels.config import divergence_chunk_rows
from ..divergence import DivergenceSpec, chunk_divergence


def divergence_sweep(hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec: DivergenceSpec,
                     inv_temperature: float, need_hidden: bool, need_weight: bool, *, budget_bytes: int, logits_into,
                     add_grad_weight):
    """hidden (N, d), weight (V, d); teacher_hidden (N, d_t), teacher_weight (V, d_t); targets (N,) int64.

    coef_of(rows, student_logprobs[rows]) -> (n,) fp32 per-token factor of D (w_t * c_t). logits_into(h, W,
    inv_temperature, out) fills out (n, V) fp32 with h @ W.T * inv_temperature; add_grad_weight(g (n, V) fp32, h,
    grad_weight) adds g.T @ h to the fp32 grad_weight. Returns (divergence, student log-probs, teacher log-probs,
    all (N,) fp32; grad_hidden (N, d) in hidden's dtype or None; grad_weight (V, d) fp32 or None).
    """
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    divergence, student_lp, teacher_lp = (torch.empty(n_tokens, dtype=torch.float32, device=device) for _ in range(3))
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    rows_per_chunk = divergence_chunk_rows(n_tokens, vocab_size, budget_bytes)
    student_buffer = torch.empty((rows_per_chunk, vocab_size), dtype=torch.float32, device=device)
    teacher_buffer = torch.empty_like(student_buffer)
    need_grad = need_hidden or need_weight
    for start in range(0, n_tokens, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_tokens))
        n = rows.stop - start
        student = logits_into(hidden[rows], weight, inv_temperature, student_buffer[:n])
        teacher = logits_into(teacher_hidden[rows], teacher_weight, inv_temperature, teacher_buffer[:n])
        divergence[rows], student_lp[rows], teacher_lp[rows], grad = chunk_divergence(
            student, teacher, targets[rows], spec, need_grad)
        if not need_grad:
            continue
        grad_logits = grad.mul_((coef_of(rows, student_lp[rows]) * inv_temperature)[:, None])
        if need_hidden:
            grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
        if need_weight:
            add_grad_weight(grad_logits, hidden[rows], grad_weight)
    return divergence, student_lp, teacher_lp, grad_hidden, grad_weight
