"""Plain PyTorch SDPO loss that materializes full logits: the ground truth every backend is held to."""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from .stats import SDPOStats


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0, bias=None,
                     scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """softcap(scale * (hidden @ weight.T + bias)) / T with softcap(z) = c * tanh(z / c) (c None: identity).

    hidden (N, d), weight (V, d), bias (V,) or None. The product and bias are formed in the input dtype (as a plain
    model forward does) and upcast to at least fp32 for the rest. Returns (N, V).
    """
    logits = hidden @ weight.T if bias is None else torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(hidden.dtype, torch.float32)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0, bias=None, scale: float = 1.0,
                             softcap: float | None = None) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,) in [0, V) -> log_softmax(`reference_logits`)[targets], fp32 (N,)."""
    logits = reference_logits(hidden, weight, temperature, bias, scale, softcap)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _heads(lm_head_weight, lm_head_bias, logit_scale, logit_softcap, teacher_lm_head_weight, teacher_lm_head_bias,
           teacher_logit_scale, teacher_logit_softcap):
    """The student's and the teacher's (weight, bias, scale, softcap): the teacher's own with its own weight, else
    the student's."""
    student = (lm_head_weight, lm_head_bias, logit_scale, logit_softcap)
    if teacher_lm_head_weight is None:
        return student, student
    return student, (teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale, teacher_logit_softcap)


def _alpha_divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized alpha-divergence per row of log-probs s (student), t (teacher): 0 KL(q||p), 1 KL(p||q),
    otherwise (1 - alpha) KL(p||m) + alpha KL(q||m) with m = (1 - alpha) p + alpha q."""
    p, q = s.exp(), t.exp()
    if alpha == 0.0:
        return (q * (t - s)).sum(-1)
    if alpha == 1.0:
        return (p * (s - t)).sum(-1)
    m = torch.log((1 - alpha) * p + alpha * q)
    return (1 - alpha) * (p * (s - m)).sum(-1) + alpha * (q * (t - m)).sum(-1)


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    mass = torch.logsumexp(logprobs, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logprobs, torch.log1p(-mass.exp())], -1)


def reference_divergence(student_logits, teacher_logits, *, mode: str, alpha: float, topk: int = 100,
                         add_tail: bool = True) -> torch.Tensor:
    """Per-row divergence of (N, V) temperature-scaled logits: mode "full_logits" or "topk_logits" (the student's
    top-k support, the teacher gathered there, a tail bucket or renormalized). (N,), differentiable."""
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    if mode == "topk_logits":
        index = torch.topk(student_logits, topk, dim=-1).indices
        s, t = s.gather(-1, index), t.gather(-1, index)
        if add_tail:
            s, t = _with_tail(s), _with_tail(t)
        else:
            s, t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return _alpha_divergence(s, t, alpha)


def reference_sdpo_loss(student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
                        teacher_lm_head_weight=None, token_weights=None, ignore_index=IGNORE_INDEX, temperature=1.0,
                        signal_clip=None, center_advantages=False, sequence_index=None,
                        distillation_mode="sampled_token", distillation_alpha=1.0, distillation_topk=100,
                        distillation_add_tail=True, behavior_logprobs=None, importance_clip=None, lm_head_bias=None,
                        logit_scale=1.0, logit_softcap=None, teacher_lm_head_bias=None, teacher_logit_scale=1.0,
                        teacher_logit_softcap=None):
    """Same arguments and result as `sdpo_loss(..., return_stats=True)`: (loss, SDPOStats), the stats unpacking
    as (logp, logq, adv) with `.divergence` besides. Full (N, V) logits are materialized."""
    d = student_hidden.shape[-1]
    targets = target_ids.reshape(-1)
    mask = targets != ignore_index
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets)).long()
    student_head, teacher_head = _heads(lm_head_weight, lm_head_bias, logit_scale, logit_softcap,
                                        teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                                        teacher_logit_softcap)
    if distillation_mode != "sampled_token":
        return _reference_distillation(student_hidden.reshape(-1, d), student_head, target_ids, mask, safe_targets,
                                       teacher_hidden, teacher_head, token_weights, temperature,
                                       distillation_mode, distillation_alpha, distillation_topk,
                                       distillation_add_tail, behavior_logprobs, importance_clip)
    weight, bias, scale, softcap = student_head
    student_lp = reference_token_logprobs(student_hidden.reshape(-1, d), weight, safe_targets, temperature, bias,
                                          scale, softcap)
    with torch.no_grad():
        if teacher_logprobs is None:
            th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            teacher_lp = reference_token_logprobs(th, teacher_head[0], safe_targets, temperature, *teacher_head[1:])
        else:
            teacher_lp = teacher_logprobs.reshape(-1).float()
    advantages = (teacher_lp - student_lp).detach()
    if center_advantages:
        seq = sequence_index.reshape(-1).long()
        masked = torch.where(mask, advantages, torch.zeros_like(advantages))
        sums = torch.zeros(targets.numel(), dtype=advantages.dtype, device=advantages.device).index_add_(0, seq, masked)
        counts = torch.zeros(targets.numel(), dtype=advantages.dtype, device=advantages.device).index_add_(0, seq, mask.to(advantages.dtype))
        advantages = advantages - (sums / counts.clamp(min=1))[seq]
    if signal_clip is not None:
        advantages = advantages.clamp(-signal_clip, signal_clip)
    weights = _weights(token_weights, mask) * _ratio(student_lp, behavior_logprobs, importance_clip)
    loss = -(weights * advantages * torch.where(mask, student_lp, torch.zeros_like(student_lp))).sum()
    zero = torch.zeros_like(advantages)
    stats = SDPOStats(*(torch.where(mask, t.detach(), zero).reshape(target_ids.shape)
                        for t in (student_lp, teacher_lp, advantages, -advantages * student_lp)))
    return loss, stats


def _weights(token_weights, mask):
    weights = mask.float() / mask.sum().clamp(min=1) if token_weights is None else token_weights.reshape(-1).float()
    return torch.where(mask, weights, torch.zeros_like(weights))


def _ratio(student_lp, behavior_logprobs, importance_clip):
    """The importance ratio min(exp(log pi - log mu), clip) with the log-ratio bounded to +-20; 1 when off."""
    if behavior_logprobs is None or importance_clip is None:
        return 1.0
    log_ratio = (student_lp.detach() - behavior_logprobs.reshape(-1)).clamp(-20.0, 20.0)
    return torch.exp(log_ratio).clamp(max=importance_clip)


def _reference_distillation(hidden, student_head, target_ids, mask, safe_targets, teacher_hidden, teacher_head,
                            token_weights, temperature, mode, alpha, topk, add_tail, behavior_logprobs,
                            importance_clip):
    compute = torch.promote_types(hidden.dtype, torch.float32)
    student_logits = reference_logits(hidden, student_head[0], temperature, *student_head[1:])
    with torch.no_grad():
        teacher_logits = reference_logits(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_head[0],
                                          temperature, *teacher_head[1:])
    divergence = reference_divergence(student_logits, teacher_logits, mode=mode, alpha=alpha, topk=topk,
                                      add_tail=add_tail)
    student_lp = torch.log_softmax(student_logits, -1).gather(-1, safe_targets[:, None]).squeeze(-1)
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, safe_targets[:, None]).squeeze(-1)
    weights = _weights(token_weights, mask).to(compute) * _ratio(student_lp, behavior_logprobs, importance_clip)
    loss = (weights * torch.where(mask, divergence, torch.zeros_like(divergence))).sum()
    zero = torch.zeros_like(divergence)
    stats = SDPOStats(*(torch.where(mask, t.detach(), zero).reshape(target_ids.shape)
                        for t in (student_lp, teacher_lp, teacher_lp - student_lp, divergence)))
    return loss, stats
