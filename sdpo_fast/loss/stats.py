"""`SDPOStats`, the per-token statistics of `sdpo_loss` and its reference."""
from __future__ import annotations

from typing import NamedTuple

import torch


class _TokenStats(NamedTuple):
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor


class SDPOStats(_TokenStats):
    """Per-token statistics, each shaped like target_ids, float32, detached, 0 at ignored positions.

    teacher_logprobs: log q as given or computed; advantages: the A_t the loss used (centred, clipped; in the
    full/top-k modes the raw log q - log pi of the target). divergence (an attribute, not unpacked with the three
    others): the per-token D_t of the mode (sampled_token: -A_t * log pi(y_t)), before token weights and
    importance ratios.
    """

    def __new__(cls, student_logprobs, teacher_logprobs, advantages, divergence):
        self = super().__new__(cls, student_logprobs, teacher_logprobs, advantages)
        self.divergence = divergence
        return self
