"""Per-token distillation divergences of one chunk of logits and their gradient w.r.t. the student's logits.

The definitions are TRL's (`trl/experimental/sdpo/loss_utils.py`), which follow the authors' verl fork:

- D_alpha(p, q) over a support with student log-probs s and teacher log-probs t: alpha = 0 forward KL
  sum q (t - s); alpha = 1 reverse KL sum p (s - t); 0 < alpha < 1 the mixture form with m = log((1 - alpha) p
  + alpha q): (1 - alpha) sum p (s - m) + alpha sum q (t - m) (alpha = 0.5: the Jensen-Shannon divergence).
- full_logits: the support is the vocabulary. topk_logits: the student's top-k tokens (torch.topk of its
  logits, ties as torch.topk), the teacher's full-vocabulary log-probs gathered there; with the tail, one more
  entry log(1 - exp(min(logsumexp(topk), -1e-7))) per side, else both renormalized over the top-k.
- The importance ratio c = min(exp(clamp(log pi(y) - log mu(y), -20, 20)), clip), held constant.

Everything here works on an (n, V) fp32 chunk of temperature-scaled logits in place; row sums are fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICY_GRADIENT_MODE = "sampled_token"
"""The distillation mode whose loss is the SDPO policy gradient on the sampled token (the others: logit modes)."""
MODES = (POLICY_GRADIENT_MODE, "full_logits", "topk_logits")
"""What `sdpo_loss` computes; the training objectives register one class per mode (loss/objectives)."""
TAIL_LOG_MASS_MAX = -1e-7
LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class DivergenceSpec:
    """mode: "full_logits" or "topk_logits"; alpha in [0, 1]; topk >= 1 (topk_logits); add_tail: the tail bucket."""

    mode: str
    alpha: float
    topk: int = 100
    add_tail: bool = True


def importance_ratio(student_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """min(exp(clamp(log pi - log mu, -20, 20)), clip), (n,) fp32, detached."""
    log_ratio = (student_logprobs.detach().float() - behavior_logprobs.float()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio.exp().clamp(max=clip)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax of an (n, V) fp32 buffer, in place (fp64 sums)."""
    row_max = logits.max(dim=1, keepdim=True).values
    logits.sub_(row_max)
    lse = logits.exp().sum(dim=1, dtype=torch.float64).log().float()
    return logits.sub_(lse[:, None])


def alpha_divergence(s: torch.Tensor, t: torch.Tensor, alpha: float, need_grad: bool):
    """D_alpha per row of log-probs s (student) and t (teacher), both (n, K) fp32, and dD/ds with the entries of
    s taken as independent (None unless need_grad). Returns ((n,) fp32, (n, K) fp32 or None)."""
    if alpha == 0.0:
        q = t.exp()
        divergence = (q * (t - s)).sum(dim=1, dtype=torch.float64).float()
        return divergence, (q.neg_() if need_grad else None)
    if alpha == 1.0:
        p = s.exp()
        log_ratio = s - t
        divergence = (p * log_ratio).sum(dim=1, dtype=torch.float64).float()
        return divergence, (log_ratio.add_(1.0).mul_(p) if need_grad else None)
    mixture = torch.logaddexp(s + math.log(1.0 - alpha), t + math.log(alpha))
    student_part = (s - mixture).mul_(s.exp())
    teacher_part = mixture.neg_().add_(t).mul_(t.exp()).sum(dim=1, dtype=torch.float64)
    divergence = ((1.0 - alpha) * student_part.sum(dim=1, dtype=torch.float64) + alpha * teacher_part).float()
    return divergence, (student_part.mul_(1.0 - alpha) if need_grad else None)


def _through_log_softmax(grad_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. z of a function of s = log_softmax(z) given dD/ds (both (n, K)); grad_s is overwritten."""
    total = grad_s.sum(dim=1, dtype=torch.float64).float()
    return grad_s.sub_(s.exp().mul_(total[:, None]))


def _tail_bucket(topk_logprobs: torch.Tensor):
    """[topk, log(1 - mass)] (n, k + 1) and the log-mass before its clamp (n, 1)."""
    log_mass = torch.logsumexp(topk_logprobs, dim=1, keepdim=True)
    tail = torch.log(-torch.expm1(log_mass.clamp(max=TAIL_LOG_MASS_MAX)))
    return torch.cat([topk_logprobs, tail], dim=1), log_mass


def chunk_divergence(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, spec: DivergenceSpec,
                     need_grad: bool):
    """One chunk. student and teacher: (n, V) fp32 temperature-scaled logits, both overwritten; targets (n,) int64.

    Returns (divergence (n,), student log-probs at targets (n,), teacher log-probs at targets (n,), dD/dz (n, V)
    fp32 held in `student`'s storage, or None unless need_grad).
    """
    if spec.mode == "topk_logits":
        _, topk_index = torch.topk(student, spec.topk, dim=1)
    s = _log_softmax_(student)
    t = _log_softmax_(teacher)
    rows = targets[:, None]
    student_lp, teacher_lp = s.gather(1, rows).squeeze(1), t.gather(1, rows).squeeze(1)
    if spec.mode == "full_logits":
        divergence, grad_s = alpha_divergence(s, t, spec.alpha, need_grad)
        return divergence, student_lp, teacher_lp, (_through_log_softmax(grad_s, s) if need_grad else None)

    s_top, t_top = s.gather(1, topk_index), t.gather(1, topk_index)
    if spec.add_tail:
        s_support, log_mass = _tail_bucket(s_top)
        t_support, _ = _tail_bucket(t_top)
    else:
        s_support = s_top - torch.logsumexp(s_top, dim=1, keepdim=True)
        t_support = t_top - torch.logsumexp(t_top, dim=1, keepdim=True)
    divergence, grad_support = alpha_divergence(s_support, t_support, spec.alpha, need_grad)
    if not need_grad:
        return divergence, student_lp, teacher_lp, None
    if spec.add_tail:
        clamped_mass = log_mass.clamp(max=TAIL_LOG_MASS_MAX).exp()
        d_tail = grad_support[:, -1:] * -clamped_mass / -torch.expm1(log_mass.clamp(max=TAIL_LOG_MASS_MAX))
        d_tail = torch.where(log_mass <= TAIL_LOG_MASS_MAX, d_tail, torch.zeros_like(d_tail))
        grad_top = grad_support[:, :-1] + d_tail * (s_top - log_mass).exp()
        total = grad_top.sum(dim=1, dtype=torch.float64).float()
        grad = s.exp_().mul_(-total[:, None])
    else:
        grad_top = _through_log_softmax(grad_support, s_support)
        grad = s.zero_()
    return divergence, student_lp, teacher_lp, grad.scatter_add_(1, topk_index, grad_top)
