"""The distillation sweep both fast backends share: chunks of student and teacher logits, the divergence and its
gradient formed in the same pass (8·N·d·V FLOPs: two logits products, grad_hidden, grad_weight).

Workspace: `kernels.config.DIVERGENCE_BUFFERS` fp32 (rows, V) buffers at most (student and teacher logits plus the temporaries
of `chunk_divergence`), one more for a soft-capped student (the cap's slope), rows chosen so that they fit the
backend's budget; never an (N, V) tensor.
"""
from __future__ import annotations

import torch

from ...kernels.config import DIVERGENCE_BUFFERS, divergence_chunk_rows
from ..divergence import DivergenceSpec, chunk_divergence
from ..head import cap_slope, soft_cap_


def divergence_sweep(hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec: DivergenceSpec,
                     inv_temperature: float, need_hidden: bool, need_weight: bool, *, budget_bytes: int, logits_into,
                     add_grad_weight, softcap: float | None = None, teacher_inv_temperature: float | None = None,
                     teacher_softcap: float | None = None):
    """hidden (N, d), weight (V, d); teacher_hidden (N, d_t), teacher_weight (V, d_t); targets (N,) int64.

    coef_of(rows, student_logprobs[rows]) -> (n,) fp32 per-token factor of D (w_t * c_t). logits_into(h, W,
    inv_temperature, out) fills out (n, V) fp32 with h @ W.T * inv_temperature; add_grad_weight(g (n, V) fp32, h,
    grad_weight) adds g.T @ h to the fp32 grad_weight. The student's logits are softcap_c(h @ W.T) *
    inv_temperature (c = softcap, None: no cap), the teacher's likewise with teacher_softcap and
    teacher_inv_temperature (None: inv_temperature). Returns (divergence, student log-probs, teacher log-probs,
    all (N,) fp32; grad_hidden (N, d) in hidden's dtype or None; grad_weight (V, d) fp32 or None).
    """
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    teacher_inv_temperature = inv_temperature if teacher_inv_temperature is None else teacher_inv_temperature
    divergence, student_lp, teacher_lp = (torch.empty(n_tokens, dtype=torch.float32, device=device) for _ in range(3))
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    need_grad = need_hidden or need_weight
    with_slope = need_grad and softcap is not None
    if with_slope:
        budget_bytes = budget_bytes * DIVERGENCE_BUFFERS // (DIVERGENCE_BUFFERS + 1)
    rows_per_chunk = divergence_chunk_rows(n_tokens, vocab_size, budget_bytes)
    student_buffer = torch.empty((rows_per_chunk, vocab_size), dtype=torch.float32, device=device)
    teacher_buffer = torch.empty_like(student_buffer)
    slope_buffer = torch.empty_like(student_buffer) if with_slope else None

    def capped_logits(h, w, cap, inv_t, out):
        if cap is None:
            return logits_into(h, w, inv_t, out)
        return soft_cap_(logits_into(h, w, 1.0, out), cap, inv_t)

    for start in range(0, n_tokens, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_tokens))
        n = rows.stop - start
        student = capped_logits(hidden[rows], weight, softcap, inv_temperature, student_buffer[:n])
        teacher = capped_logits(teacher_hidden[rows], teacher_weight, teacher_softcap, teacher_inv_temperature,
                                teacher_buffer[:n])
        slope = cap_slope(student, softcap, inv_temperature, slope_buffer[:n]) if with_slope else None
        divergence[rows], student_lp[rows], teacher_lp[rows], grad = chunk_divergence(
            student, teacher, targets[rows], spec, need_grad)
        if not need_grad:
            continue
        grad_logits = grad.mul_((coef_of(rows, student_lp[rows]) * inv_temperature)[:, None])
        if slope is not None:
            grad_logits.mul_(slope)
        if need_hidden:
            grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
        if need_weight:
            add_grad_weight(grad_logits, hidden[rows], grad_weight)
    return divergence, student_lp, teacher_lp, grad_hidden, grad_weight
