"""Grad-in-forward path, logit modes: one program per row of a student logits chunk (raw h @ W.T from a GEMM, in the
input dtype) and the teacher's (its log-sum-exp from `row_lse`) forms the row's alpha-divergence D, log pi(y) and the
token's coefficient w * c (c the clipped importance ratio with HAS_RATIO), and with NEED_GRAD overwrites the
student row with coef * d(D)/d(raw logits) in the same dtype. Definitions as `loss.divergence`.

MODE 0: full_logits; 1: topk_logits with the tail bucket; 2: topk_logits renormalized. The top-k support (n, K)
int64, the student's K largest logits, comes from torch.topk of the chunk. ALPHA_KIND 0: alpha = 0 (forward KL),
1: alpha = 1 (reverse KL), 2: the mixture form (log_alpha and log_rest = log(1 - alpha)). Row sums are carried
across blocks in fp64.
"""
import torch
import triton
import triton.language as tl

from .config import Launch
from .row_lse import expm1_nonpositive, head_logits, row_head_lse, row_meta

TAIL_LOG_MASS_MAX = -1e-7


@triton.jit
def _terms(s, t, alpha, log_alpha, log_rest, ALPHA_KIND: tl.constexpr):
    """Per entry of log-probs s (student), t (teacher): the divergence's term and its derivative in s."""
    if ALPHA_KIND == 0:
        q = tl.exp(t)
        return q * (t - s), -q
    elif ALPHA_KIND == 1:
        p = tl.exp(s)
        return p * (s - t), p * (s - t + 1.0)
    else:
        a, b = s + log_rest, t + log_alpha
        small = tl.exp(-tl.abs(a - b))
        one_plus = 1.0 + small  # log1p(small) = log(1 + small) * small / ((1 + small) - 1), exact to rounding
        log1p = tl.where(one_plus == 1.0, small, tl.log(one_plus) * small / (one_plus - 1.0))
        mixture = tl.maximum(a, b) + log1p
        student_part = tl.exp(s) * (s - mixture)
        return (1.0 - alpha) * student_part + alpha * tl.exp(t) * (t - mixture), (1.0 - alpha) * student_part


@triton.jit
def _masked_lse(x, mask):
    top = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    return top + tl.log(tl.sum(tl.where(mask, tl.exp(x - top), 0.0), axis=0))


@triton.jit
def _log_one_minus(log_mass):
    """log(1 - exp(min(log_mass, TAIL_LOG_MASS_MAX))) and d/d(log_mass) (0 where the clamp holds)."""
    clamped = tl.minimum(log_mass, -1e-7)
    rest = -expm1_nonpositive(clamped)
    return tl.log(rest), tl.where(log_mass <= -1e-7, -tl.exp(clamped) / rest, 0.0)


@triton.jit
def row_divergence_grad_kernel(
    logits_ptr, teacher_ptr, teacher_lse_ptr, target_ptr, weight_ptr, behavior_ptr, topk_ptr,
    divergence_ptr, student_lp_ptr, coef_ptr,
    vocab_size, topk, stride_n, stride_tn, stride_kn,
    inv_temperature, softcap, teacher_inv_temperature, teacher_softcap, alpha, log_alpha, log_rest, importance_clip,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, ALPHA_KIND: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_TEACHER_CAP: tl.constexpr, HAS_RATIO: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    teacher_row = teacher_ptr + row * stride_tn
    target = tl.load(target_ptr + row)
    lse, target_logit = row_head_lse(row_ptr, target, vocab_size, inv_temperature, softcap, BLOCK_V, HAS_CAP)
    teacher_lse = tl.load(teacher_lse_ptr + row)
    student_lp = target_logit - lse
    coef = tl.load(weight_ptr + row)
    if HAS_RATIO:
        log_ratio = tl.minimum(tl.maximum(student_lp - tl.load(behavior_ptr + row), -20.0), 20.0)
        coef = coef * tl.minimum(tl.exp(log_ratio), importance_clip)
    offs_v = tl.arange(0, BLOCK_V)
    if MODE == 0:
        divergence = tl.zeros([1], dtype=tl.float64).sum(axis=0)
        total = tl.zeros([1], dtype=tl.float64).sum(axis=0)
        for v0 in range(0, vocab_size, BLOCK_V):
            cols = v0 + offs_v
            valid = cols < vocab_size
            s = head_logits(tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32), softcap,
                            inv_temperature, HAS_CAP) - lse
            t = head_logits(tl.load(teacher_row + cols, mask=valid, other=0.0).to(tl.float32), teacher_softcap,
                            teacher_inv_temperature, HAS_TEACHER_CAP) - teacher_lse
            term, grad_s = _terms(s, t, alpha, log_alpha, log_rest, ALPHA_KIND)
            divergence += tl.sum(tl.where(valid, term, 0.0), axis=0).to(tl.float64)
            total += tl.sum(tl.where(valid, grad_s, 0.0), axis=0).to(tl.float64)
        divergence = divergence.to(tl.float32)
        total = total.to(tl.float32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        k_valid = offs_k < topk
        index = tl.load(topk_ptr + row * stride_kn + offs_k, mask=k_valid, other=0)
        z_top = head_logits(tl.load(row_ptr + index, mask=k_valid, other=0.0).to(tl.float32), softcap,
                            inv_temperature, HAS_CAP)
        s_top = tl.where(k_valid, z_top - lse, 0.0)
        t_top = tl.where(k_valid, head_logits(tl.load(teacher_row + index, mask=k_valid, other=0.0).to(tl.float32),
                                              teacher_softcap, teacher_inv_temperature, HAS_TEACHER_CAP)
                         - teacher_lse, 0.0)
        if MODE == 1:
            log_mass = _masked_lse(s_top, k_valid)
            tail_s, d_tail_s = _log_one_minus(log_mass)
            tail_t, _ = _log_one_minus(_masked_lse(t_top, k_valid))
            term, grad_s = _terms(s_top, t_top, alpha, log_alpha, log_rest, ALPHA_KIND)
            tail_term, tail_grad = _terms(tail_s, tail_t, alpha, log_alpha, log_rest, ALPHA_KIND)
            divergence = tl.sum(tl.where(k_valid, term, 0.0), axis=0) + tail_term
            grad_top = grad_s + tail_grad * d_tail_s * tl.exp(s_top - log_mass)
            total = tl.sum(tl.where(k_valid, grad_top, 0.0), axis=0)
        else:
            s_support = tl.where(k_valid, s_top - _masked_lse(s_top, k_valid), 0.0)
            t_support = tl.where(k_valid, t_top - _masked_lse(t_top, k_valid), 0.0)
            term, grad_s = _terms(s_support, t_support, alpha, log_alpha, log_rest, ALPHA_KIND)
            divergence = tl.sum(tl.where(k_valid, term, 0.0), axis=0)
            grad_s = tl.where(k_valid, grad_s, 0.0)
            grad_top = grad_s - tl.exp(s_support) * tl.sum(grad_s, axis=0)
            total = 0.0
    tl.store(divergence_ptr + row, divergence)
    tl.store(student_lp_ptr + row, student_lp)
    tl.store(coef_ptr + row, coef)
    if NEED_GRAD:
        scale = coef * inv_temperature
        for v0 in range(0, vocab_size, BLOCK_V):
            cols = v0 + offs_v
            valid = cols < vocab_size
            logits = head_logits(tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32), softcap,
                                 inv_temperature, HAS_CAP)
            if MODE == 0:
                s = logits - lse
                t = head_logits(tl.load(teacher_row + cols, mask=valid, other=0.0).to(tl.float32), teacher_softcap,
                                teacher_inv_temperature, HAS_TEACHER_CAP) - teacher_lse
                _, grad_s = _terms(s, t, alpha, log_alpha, log_rest, ALPHA_KIND)
                grad = grad_s - tl.exp(s) * total
            elif MODE == 1:
                grad = -total * tl.exp(logits - lse)
            else:
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            grad = grad * scale
            if HAS_CAP:
                tanh = logits / (softcap * inv_temperature)
                grad = grad * (1.0 - tanh * tanh)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=valid)
        if MODE != 0:
            tl.debug_barrier()  # the support's entries below overwrite what this row's sweep stored
            grad = grad_top * scale
            if MODE == 1:
                grad = grad - total * tl.exp(s_top) * scale
            if HAS_CAP:
                tanh = z_top / (softcap * inv_temperature)
                grad = grad * (1.0 - tanh * tanh)
            tl.store(row_ptr + index, grad.to(logits_ptr.dtype.element_ty), mask=k_valid)


def alpha_kind(alpha: float) -> int:
    return 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2


def row_divergence_grad_launch(logits, teacher, teacher_lse, targets, weights, behavior_lp, topk_index, divergence,
                               student_lp, coef, spec, inv_temperature: float, teacher_inv_temperature: float, *,
                               softcap=None, teacher_softcap=None, importance_clip=None, need_grad=True) -> Launch:
    """logits and teacher (n, V) raw rows (unit column stride); teacher_lse (n,) fp32 of the teacher's head logits;
    targets (n,) int64; weights (n,) fp32; behavior_lp (n,) fp32 or None; topk_index (n, K) int64 (topk_logits)
    or None; spec a `loss.divergence.DivergenceSpec`. Fills divergence, student_lp and coef (n,) fp32."""
    import math

    has_ratio = behavior_lp is not None and importance_clip is not None
    mode = 0 if spec.mode == "full_logits" else 1 if spec.add_tail else 2
    index = topk_index if topk_index is not None else targets[:, None]
    alpha = float(spec.alpha)
    return Launch(row_divergence_grad_kernel, (logits.shape[0],),
                  (logits, teacher, teacher_lse, targets, weights, behavior_lp if has_ratio else weights, index,
                   divergence, student_lp, coef, logits.shape[1], index.shape[1], logits.stride(0), teacher.stride(0),
                   index.stride(0), inv_temperature, 1.0 if softcap is None else softcap, teacher_inv_temperature,
                   1.0 if teacher_softcap is None else teacher_softcap, alpha,
                   math.log(alpha) if alpha > 0 else 0.0, math.log1p(-alpha) if alpha < 1 else 0.0,
                   1.0 if importance_clip is None else float(importance_clip)),
                  dict(**row_meta(logits.device), BLOCK_K=max(16, triton.next_power_of_2(index.shape[1])), MODE=mode,
                       ALPHA_KIND=alpha_kind(alpha), HAS_CAP=softcap is not None,
                       HAS_TEACHER_CAP=teacher_softcap is not None, HAS_RATIO=has_ratio, NEED_GRAD=need_grad))


def row_divergence_grad(logits, teacher, teacher_lse, targets, weights, behavior_lp, topk_index, spec,
                        inv_temperature: float, teacher_inv_temperature: float, *, softcap=None, teacher_softcap=None,
                        importance_clip=None, need_grad=True):
    """(divergence, student log-probs, coef), (n,) fp32 each; with need_grad, `logits` then holds
    coef * d(D)/d(raw logits). See `row_divergence_grad_launch`."""
    out = [torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device) for _ in range(3)]
    if logits.shape[0]:
        row_divergence_grad_launch(logits, teacher, teacher_lse, targets, weights, behavior_lp, topk_index, *out, spec,
                                   inv_temperature, teacher_inv_temperature, softcap=softcap,
                                   teacher_softcap=teacher_softcap, importance_clip=importance_clip,
                                   need_grad=need_grad)()
    return tuple(out)
