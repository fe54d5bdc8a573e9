"""Plain PyTorch SDPO loss that materializes full logits: the ground truth every backend is held to."""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,) in [0, V) -> log_softmax(hidden @ weight.T / T)[targets], fp32 (N,).

    The (N, V) logits are formed in the input dtype (as a plain model forward does) and upcast to at least fp32.
    """
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_sdpo_loss(student_hidden, lm_head_weight, target_ids, *, teacher_hidden=None, teacher_logprobs=None,
                        teacher_lm_head_weight=None, token_weights=None, ignore_index=IGNORE_INDEX, temperature=1.0,
                        signal_clip=None, center_advantages=False, sequence_index=None):
    """Same arguments and result as `sdpo_loss(..., return_stats=True)`; returns (loss, (logp, logq, adv))."""
    d = student_hidden.shape[-1]
    targets = target_ids.reshape(-1)
    mask = targets != ignore_index
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets)).long()
    student_lp = reference_token_logprobs(student_hidden.reshape(-1, d), lm_head_weight, safe_targets, temperature)
    with torch.no_grad():
        if teacher_logprobs is None:
            weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
            th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            teacher_lp = reference_token_logprobs(th, weight, safe_targets, temperature)
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
    if token_weights is None:
        weights = mask.float() / mask.sum().clamp(min=1)
    else:
        weights = token_weights.reshape(-1).float()
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    loss = -(weights * advantages * torch.where(mask, student_lp, torch.zeros_like(student_lp))).sum()
    zero = torch.zeros_like(advantages)
    stats = tuple(torch.where(mask, t.detach(), zero).reshape(target_ids.shape)
                  for t in (student_lp, teacher_lp, advantages))
    return loss, stats
