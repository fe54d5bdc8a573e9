"""Grad-in-forward path, sampled_token: one program per row of a student logits chunk (raw h @ W.T from a GEMM, in
the input dtype) forms log pi(y), the token's coefficient and, with NEED_GRAD, overwrites the row with
d(loss)/d(raw logits) in the same dtype.

coef = w * clip(log q(y) - log pi(y)) * min(exp(clamp(log pi(y) - log mu(y), -20, 20)), importance_clip) (the
clip with HAS_CLIP, the ratio with HAS_RATIO), held constant; the row's gradient is
-coef * inv_temperature * (onehot(y) - softmax(z)) times the soft cap's slope 1 - tanh^2 (HAS_CAP).
"""
import torch
import triton
import triton.language as tl

from .config import Launch
from .row_lse import expm1_nonpositive, head_logits, row_head_lse, row_meta


@triton.jit
def row_token_grad_kernel(
    logits_ptr, target_ptr, teacher_lp_ptr, weight_ptr, behavior_ptr, student_lp_ptr, coef_ptr,
    vocab_size, stride_n, inv_temperature, softcap, signal_clip, importance_clip,
    BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_RATIO: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    target = tl.load(target_ptr + row)
    lse, target_logit = row_head_lse(row_ptr, target, vocab_size, inv_temperature, softcap, BLOCK_V, HAS_CAP)
    student_lp = target_logit - lse
    advantage = tl.load(teacher_lp_ptr + row) - student_lp
    if HAS_CLIP:
        advantage = tl.minimum(tl.maximum(advantage, -signal_clip), signal_clip)
    coef = tl.load(weight_ptr + row) * advantage
    if HAS_RATIO:
        log_ratio = tl.minimum(tl.maximum(student_lp - tl.load(behavior_ptr + row), -20.0), 20.0)
        coef = coef * tl.minimum(tl.exp(log_ratio), importance_clip)
    tl.store(student_lp_ptr + row, student_lp)
    tl.store(coef_ptr + row, coef)
    if NEED_GRAD:
        offs_v = tl.arange(0, BLOCK_V)
        scale = coef * inv_temperature
        for v0 in range(0, vocab_size, BLOCK_V):
            cols = v0 + offs_v
            valid = cols < vocab_size
            raw = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            logits = head_logits(raw, softcap, inv_temperature, HAS_CAP)
            probs = tl.exp(logits - lse)
            grad = scale * tl.where(cols == target, probs - 1.0, probs)
            if HAS_CAP:
                tanh = logits / (softcap * inv_temperature)
                grad = grad * (1.0 - tanh * tanh)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=valid)


def row_token_grad_launch(logits, targets, teacher_lp, weights, behavior_lp, student_lp, coef, inv_temperature: float,
                          *, softcap=None, signal_clip=None, importance_clip=None, need_grad=True) -> Launch:
    """logits (n, V) raw rows, unit column stride; targets (n,) int64; teacher_lp, weights (n,) fp32; behavior_lp
    (n,) fp32 or None (no ratio); fills student_lp and coef (n,) fp32 (and the gradient into logits)."""
    has_ratio = behavior_lp is not None and importance_clip is not None
    return Launch(row_token_grad_kernel, (logits.shape[0],),
                  (logits, targets, teacher_lp, weights, behavior_lp if has_ratio else weights, student_lp, coef,
                   logits.shape[1], logits.stride(0), inv_temperature, 1.0 if softcap is None else softcap,
                   0.0 if signal_clip is None else float(signal_clip),
                   1.0 if importance_clip is None else float(importance_clip)),
                  dict(**row_meta(logits.device), HAS_CAP=softcap is not None, HAS_CLIP=signal_clip is not None,
                       HAS_RATIO=has_ratio, NEED_GRAD=need_grad))


def row_token_grad(logits, targets, teacher_lp, weights, behavior_lp, inv_temperature: float, *, softcap=None,
                   signal_clip=None, importance_clip=None, need_grad=True):
    """(student log-probs, coef), (n,) fp32 each; with need_grad, `logits` now holds d(loss)/d(raw logits)."""
    student_lp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    coef = torch.empty_like(student_lp)
    if logits.shape[0]:
        row_token_grad_launch(logits, targets, teacher_lp, weights, behavior_lp, student_lp, coef, inv_temperature,
                              softcap=softcap, signal_clip=signal_clip, importance_clip=importance_clip,
                              need_grad=need_grad)()
    return student_lp, coef
