"""Chunked PyTorch backend: per-token log-probs and the advantage-weighted gradient without an (N, V) buffer.

Tokens are processed in chunks whose fp32 logits fit one reused buffer of `SDPO_FAST_TORCH_CHUNK_MB` (default
64 MiB; larger chunks make fewer passes over the fp32 grad_weight). `logprobs_and_grad` forms the gradient in
the same sweep as the student's log-probs; `grad` recomputes the chunk's softmax exactly as that sweep does, so
both give bit-identical gradients for the same coefficients. A soft cap (`softcap`, see `loss.head`) keeps one more
(rows, V) fp32 buffer, its slope, within the same budget.
"""
from __future__ import annotations

import os

import torch

from ...kernels.config import DIVERGENCE_BUFFERS
from ..divergence import POLICY_GRADIENT_MODE, chunk_divergence, importance_ratio
from ..head import cap_slope, soft_cap_
from .chunked_divergence import divergence_sweep


def _budget_bytes() -> int:
    return int(os.environ.get("SDPO_FAST_TORCH_CHUNK_MB", "64")) << 20


def _chunks(n_tokens: int, vocab_size: int, device: torch.device, buffers: int = 1):
    """Row slices whose `buffers` fp32 (rows, V) buffers fit the budget together, and those reusable buffers."""
    rows = min(max(1, _budget_bytes() // (4 * vocab_size * buffers)), max(n_tokens, 1))
    whole = [torch.empty((rows, vocab_size), dtype=torch.float32, device=device) for _ in range(buffers)]
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        yield slice(start, stop), [buffer[: stop - start] for buffer in whole]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float, out: torch.Tensor,
            softcap: float | None = None) -> torch.Tensor:
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight.T, out=out)
    else:
        out.copy_(hidden @ weight.T)
    return soft_cap_(out, softcap, inv_temperature)


def _softmax_parts(hidden, weight, targets, inv_temperature: float, buffer: torch.Tensor, softcap=None, slope=None):
    """One chunk: exp(z - max) (n, V) fp32 (in `buffer`), its row sums (n,) fp64, and the target log-probs
    (n,) fp32. With `slope` (n, V) fp32 given, the soft cap's slope is written there first.
    """
    logits = _logits(hidden, weight, inv_temperature, buffer, softcap)
    if slope is not None:
        cap_slope(logits, softcap, inv_temperature, slope)
    exp, sums, target_logit, row_max = _softmax_of(logits, targets)
    return exp, sums, (target_logit - row_max - sums.log()).float()


def _softmax_of(logits: torch.Tensor, targets: torch.Tensor):
    """exp(z - max) in place of the fp32 logits z (n, V), its row sums (n,) fp64, the target logits and the row
    maxima (n,) fp32. Row sums are fp64: an fp32 sum over a 10^5-word vocabulary loses ~1e-5 of relative precision.
    """
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.max(dim=1, keepdim=True).values.squeeze(1)
    exp = logits.sub_(row_max[:, None]).exp_()
    return exp, exp.sum(dim=1, dtype=torch.float64), target_logit, row_max


class TorchBackend:
    """The chunked PyTorch backend (CPU default; any device)."""

    name = "torch"

    @property
    def row_ops(self) -> "TorchRowOps":
        return TorchRowOps()

    @staticmethod
    def default_workspace_bytes() -> int:
        """SDPO_FAST_TORCH_CHUNK_MB (64 MiB)."""
        return _budget_bytes()

    def token_logprobs(self, hidden, weight, targets, inv_temperature: float, softcap: float | None = None):
        n_tokens = hidden.shape[0]
        logprobs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        for rows, (buffer,) in _chunks(n_tokens, weight.shape[0], hidden.device):
            _, _, logprobs[rows] = _softmax_parts(hidden[rows], weight, targets[rows], inv_temperature, buffer,
                                                  softcap)
        return logprobs, None

    def grad(self, hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool,
             need_weight: bool, grad_weight_dtype: torch.dtype = torch.float32, softcap: float | None = None):
        _, grad_hidden, grad_weight = self.logprobs_and_grad(
            hidden, weight, targets, inv_temperature, lambda rows, _: coef[rows], need_hidden, need_weight, softcap)
        return grad_hidden, None if grad_weight is None else grad_weight.to(grad_weight_dtype)

    def logprobs_and_grad(self, hidden, weight, targets, inv_temperature: float, coef_of, need_hidden: bool,
                          need_weight: bool, softcap: float | None = None):
        n_tokens = hidden.shape[0]
        logprobs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for rows, (buffer, *slope) in _chunks(n_tokens, weight.shape[0], hidden.device, 1 + (softcap is not None)):
            slope = slope[0] if slope else None
            exp, sums, logprobs[rows] = _softmax_parts(hidden[rows], weight, targets[rows], inv_temperature, buffer,
                                                       softcap, slope)
            probs = exp.div_(sums.float()[:, None])
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
            grad_logits = probs.mul_((coef_of(rows, logprobs[rows]) * inv_temperature)[:, None])
            if slope is not None:
                grad_logits.mul_(slope)
            if need_hidden:
                grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[rows].float())
        return logprobs, grad_hidden, grad_weight

    def divergence(self, hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec,
                   inv_temperature: float, need_hidden: bool, need_weight: bool, softcap: float | None = None,
                   teacher_inv_temperature: float | None = None, teacher_softcap: float | None = None):
        """See `chunked_divergence.divergence_sweep`; workspace within SDPO_FAST_TORCH_CHUNK_MB."""
        return divergence_sweep(
            hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec, inv_temperature, need_hidden,
            need_weight, budget_bytes=_budget_bytes(), logits_into=_logits,
            add_grad_weight=lambda grad, rows_hidden, out: out.addmm_(grad.T, rows_hidden.float()), softcap=softcap,
            teacher_inv_temperature=teacher_inv_temperature, teacher_softcap=teacher_softcap)


class TorchRowOps:
    """`gemm_sweep.RowOps` in PyTorch: each chunk is worked on as fp32 (a copy when the input dtype is 16-bit) with
    fp64 row sums, the logit modes by `loss.divergence.chunk_divergence`."""

    def bytes_per_row(self, mode: str, dtype: torch.dtype, vocab_size: int, topk: int, need_grad: bool,
                      softcap: bool) -> int:
        """The chunk buffers in `dtype`, the fp32 working copies of a 16-bit chunk, the soft cap's slope and the
        temporaries of the row pass (`chunk_divergence`'s for the logit modes), per row."""
        copies = 0 if dtype == torch.float32 else 1
        if mode == POLICY_GRADIENT_MODE:
            fp32_rows = copies + 2 + (need_grad and softcap)
            return vocab_size * (dtype.itemsize + 4 * fp32_rows)
        fp32_rows = 2 * copies + DIVERGENCE_BUFFERS + (need_grad and softcap)
        return vocab_size * (2 * dtype.itemsize + 4 * fp32_rows) + 24 * topk

    def teacher_rows(self, chunk, targets, inv_temperature: float, softcap):
        """(lse (n,) fp64, target logit (n,) fp32) of the head logits of the raw chunk (overwritten when fp32)."""
        logits = soft_cap_(chunk.float() if chunk.dtype != torch.float32 else chunk, softcap, inv_temperature)
        _, sums, target_logit, row_max = _softmax_of(logits, targets)
        return row_max + sums.log(), target_logit

    def token_rows(self, chunk, targets, teacher_lp, weights, behavior_lp, inv_temperature: float, *, softcap,
                   signal_clip, importance_clip, need_grad: bool):
        logits = soft_cap_(chunk.float() if chunk.dtype != torch.float32 else chunk, softcap, inv_temperature)
        slope = cap_slope(logits, softcap, inv_temperature, torch.empty_like(logits)) \
            if need_grad and softcap is not None else None
        exp, sums, target_logit, row_max = _softmax_of(logits, targets)
        student_lp = (target_logit - row_max - sums.log()).float()
        advantage = teacher_lp - student_lp
        if signal_clip is not None:
            advantage = advantage.clamp(-signal_clip, signal_clip)
        coef = weights * advantage
        if importance_clip is not None and behavior_lp is not None:
            coef = coef * importance_ratio(student_lp, behavior_lp, importance_clip)
        if need_grad:
            probs = exp.div_(sums.float()[:, None])
            probs[torch.arange(probs.shape[0], device=probs.device), targets] -= 1.0
            grad = probs.mul_((coef * inv_temperature)[:, None])
            if slope is not None:
                grad.mul_(slope)
            if grad.data_ptr() != chunk.data_ptr():
                chunk.copy_(grad)
        return student_lp, coef

    def divergence_rows(self, chunk, teacher_chunk, targets, weights, behavior_lp, spec, inv_temperature: float,
                        teacher_inv_temperature: float, *, softcap, teacher_softcap, importance_clip,
                        need_grad: bool):
        student = soft_cap_(chunk.float() if chunk.dtype != torch.float32 else chunk, softcap, inv_temperature)
        teacher = soft_cap_(teacher_chunk.float() if teacher_chunk.dtype != torch.float32 else teacher_chunk,
                            teacher_softcap, teacher_inv_temperature)
        slope = cap_slope(student, softcap, inv_temperature, torch.empty_like(student)) \
            if need_grad and softcap is not None else None
        divergence, student_lp, teacher_lp, grad = chunk_divergence(student, teacher, targets, spec, need_grad)
        coef = weights if importance_clip is None or behavior_lp is None \
            else weights * importance_ratio(student_lp, behavior_lp, importance_clip)
        if need_grad:
            grad.mul_((coef * inv_temperature)[:, None])
            if slope is not None:
                grad.mul_(slope)
            if grad.data_ptr() != chunk.data_ptr():
                chunk.copy_(grad)
        return divergence, student_lp, teacher_lp, coef

    def add_grad_weight(self, grad, hidden, grad_weight) -> None:
        grad_weight.addmm_(grad.T.float(), hidden.float())
