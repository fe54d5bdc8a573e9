"""The grad-in-forward path: logits chunks from one GEMM each (torch.mm: cuBLAS on CUDA), one row pass forming the
loss terms and d(loss)/d(logits) in place, then dX = G @ W and dW += G.T @ h; no logits are ever recomputed.

A backend supplies its `RowOps`: the row passes over a chunk of raw products h @ W.T (input dtype; the head, see
`loss.head`, is applied inside them) and the fp32 accumulation of dW. The Triton backend's are kernels
(`kernels.row_lse`, `kernels.row_token_grad`, `kernels.row_divergence_grad`), the torch backend's are
PyTorch.
FLOPs: 2·N·d·V per logits GEMM, 4·N·d·V for dX and dW: 8·N·d·V for sampled_token with a teacher head and for the
logit modes, 6 with a frozen head (no dW); centring adds one more student GEMM (10), see `token_grad_sweep`.
Workspace: (rows, V) buffers in the input dtype (one for sampled_token, whose teacher pass runs before the
student's; two for the logit modes) plus the row passes' own temporaries, `RowOps.bytes_per_row` per row in all;
rows per chunk are as many as the budget holds.
"""
from __future__ import annotations

from typing import Protocol

import torch


class RowOps(Protocol):
    def bytes_per_row(self, mode: str, dtype: torch.dtype, vocab_size: int, topk: int, need_grad: bool,
                      softcap: bool) -> int: ...

    def teacher_rows(self, chunk, targets, inv_temperature: float, softcap): ...

    def token_rows(self, chunk, targets, teacher_lp, weights, behavior_lp, inv_temperature: float, *, softcap,
                   signal_clip, importance_clip, need_grad: bool): ...

    def divergence_rows(self, chunk, teacher_chunk, targets, weights, behavior_lp, spec, inv_temperature: float,
                        teacher_inv_temperature: float, *, softcap, teacher_softcap, importance_clip,
                        need_grad: bool): ...

    def add_grad_weight(self, grad, hidden, grad_weight) -> None: ...


def chunk_rows(ops: RowOps, n_tokens: int, budget_bytes: int, *args) -> int:
    """Rows per chunk whose workspace (`ops.bytes_per_row(*args)` each) fits budget_bytes, at most n_tokens (0 when
    not one row fits)."""
    return min(budget_bytes // ops.bytes_per_row(*args), max(n_tokens, 1))


def _chunks(n_tokens: int, rows: int, vocab_size: int, dtypes: tuple, device):
    """Row spans of `rows` and views of one reused (rows, V) buffer per dtype in `dtypes`."""
    if rows < 1:
        raise ValueError("workspace_bytes holds no row of the grad-in-forward path; raise workspace_bytes or pass "
                         "grad_in_forward=False")
    workspace = [torch.empty((rows, vocab_size), dtype=dtype, device=device) for dtype in dtypes]
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        yield slice(start, stop), [buffer[: stop - start] for buffer in workspace]


def logprobs_sweep(ops: RowOps, hidden, weight, targets, inv_temperature: float, *, budget_bytes: int, softcap=None):
    """log_softmax(head(hidden @ weight.T))[targets], (N,) fp32 (the teacher's pass, and the student's first pass
    under centring). hidden (N, d), weight (V, d) one float dtype; targets (N,) int64."""
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    logprobs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows(ops, n_tokens, budget_bytes, "sampled_token", hidden.dtype, vocab_size, 0, False, False)
    for span, (chunk,) in _chunks(n_tokens, rows, vocab_size, (hidden.dtype,), hidden.device):
        torch.mm(hidden[span], weight.T, out=chunk)
        lse, target_logit = ops.teacher_rows(chunk, targets[span], inv_temperature, softcap)
        logprobs[span] = target_logit - lse
    return logprobs


def _gradients(ops: RowOps, chunk, hidden_rows, weight, span, grad_hidden, grad_weight):
    if grad_hidden is not None:
        torch.mm(chunk, weight, out=grad_hidden[span])
    if grad_weight is not None:
        ops.add_grad_weight(chunk, hidden_rows, grad_weight)


def _outputs(hidden, weight, need_hidden: bool, need_weight: bool):
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    return grad_hidden, grad_weight


def token_grad_sweep(ops: RowOps, hidden, weight, targets, teacher_lp, weights, behavior_lp, inv_temperature: float,
                     need_hidden: bool, need_weight: bool, *, budget_bytes: int, softcap=None, signal_clip=None,
                     importance_clip=None):
    """sampled_token: loss = -sum_n coef_n * log pi_n with coef = w * clip(log q - log pi) * c held constant.

    hidden (N, d), weight (V, d) one float dtype; targets (N,) int64; teacher_lp, weights (N,) fp32; behavior_lp
    (N,) fp32 or None. Returns (student log-probs, coef, both (N,) fp32; grad_hidden (N, d) in hidden's dtype or
    None; grad_weight (V, d) fp32 or None). A centred teacher_lp (per-sequence means of log q - log pi) needs
    the student's log-probs first: `logprobs_sweep` before this one, 2·N·d·V more.
    """
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    need_grad = need_hidden or need_weight
    student_lp, coef = (torch.empty(n_tokens, dtype=torch.float32, device=hidden.device) for _ in range(2))
    grad_hidden, grad_weight = _outputs(hidden, weight, need_hidden, need_weight)
    rows = chunk_rows(ops, n_tokens, budget_bytes, "sampled_token", hidden.dtype, vocab_size, 0, need_grad,
                      softcap is not None)
    for span, (chunk,) in _chunks(n_tokens, rows, vocab_size, (hidden.dtype,), hidden.device):
        torch.mm(hidden[span], weight.T, out=chunk)
        student_lp[span], coef[span] = ops.token_rows(
            chunk, targets[span], teacher_lp[span], weights[span], None if behavior_lp is None else behavior_lp[span],
            inv_temperature, softcap=softcap, signal_clip=signal_clip, importance_clip=importance_clip,
            need_grad=need_grad)
        if need_grad:
            _gradients(ops, chunk, hidden[span], weight, span, grad_hidden, grad_weight)
    return student_lp, coef, grad_hidden, grad_weight


def divergence_grad_sweep(ops: RowOps, hidden, weight, teacher_hidden, teacher_weight, targets, weights, behavior_lp,
                          spec, inv_temperature: float, need_hidden: bool, need_weight: bool, *, budget_bytes: int,
                          softcap=None, teacher_inv_temperature: float | None = None, teacher_softcap=None,
                          importance_clip=None):
    """Logit modes: loss = sum_n coef_n * D_n with coef = w * c held constant; teacher_hidden (N, d_t) with
    teacher_weight (V, d_t) in one float dtype. Returns (divergence, student log-probs, teacher log-probs, coef,
    (N,) fp32 each; grad_hidden (N, d) or None; grad_weight (V, d) fp32 or None)."""
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    need_grad = need_hidden or need_weight
    teacher_inv_temperature = inv_temperature if teacher_inv_temperature is None else teacher_inv_temperature
    divergence, student_lp, teacher_lp, coef = (torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
                                                for _ in range(4))
    grad_hidden, grad_weight = _outputs(hidden, weight, need_hidden, need_weight)
    topk = spec.topk if spec.mode == "topk_logits" else 0
    wider = max(hidden.dtype, teacher_hidden.dtype, key=lambda dtype: dtype.itemsize)
    rows = chunk_rows(ops, n_tokens, budget_bytes, spec.mode, wider, vocab_size, topk, need_grad, softcap is not None)
    for span, (chunk, teacher_chunk) in _chunks(n_tokens, rows, vocab_size, (hidden.dtype, teacher_hidden.dtype),
                                                    hidden.device):
        torch.mm(hidden[span], weight.T, out=chunk)
        torch.mm(teacher_hidden[span], teacher_weight.T, out=teacher_chunk)
        divergence[span], student_lp[span], teacher_lp[span], coef[span] = ops.divergence_rows(
            chunk, teacher_chunk, targets[span], weights[span], None if behavior_lp is None else behavior_lp[span],
            spec, inv_temperature, teacher_inv_temperature, softcap=softcap, teacher_softcap=teacher_softcap,
            importance_clip=importance_clip, need_grad=need_grad)
        if need_grad:
            _gradients(ops, chunk, hidden[span], weight, span, grad_hidden, grad_weight)
    return divergence, student_lp, teacher_lp, coef, grad_hidden, grad_weight
