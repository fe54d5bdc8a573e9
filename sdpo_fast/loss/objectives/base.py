"""The objective interface: one micro-batch's loss-token tensors in, a loss and a per-token signal out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..head import LogitHead, head_kwargs


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch; N = its completion tokens, d = hidden size.

    student_hidden (N, d) with grad; lm_head_weight (V, d); target_ids (N,) int64, IGNORE_INDEX where no loss;
    token_weights (N,) fp32; sequence_index (N,) int64 (the sequence each token belongs to); teacher_hidden
    (N, d_t) detached or None; teacher_lm_head_weight (V, d_t) or None (the teacher uses lm_head_weight);
    behavior_logprobs (N,) fp32 or None: the sampler's log mu(y_t), for importance clipping. head: the student
    model's logit head (its bias, scale and soft cap; None: none), teacher_head the teacher's own (None: the
    student's head, or teacher_lm_head_weight alone).
    """

    student_hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    target_ids: torch.Tensor
    token_weights: torch.Tensor
    sequence_index: torch.Tensor
    teacher_hidden: torch.Tensor | None = None
    teacher_lm_head_weight: torch.Tensor | None = None
    behavior_logprobs: torch.Tensor | None = None
    head: LogitHead | None = None
    teacher_head: LogitHead | None = None

    def head_kwargs(self) -> dict:
        """The `sdpo_loss` keyword arguments of the student's and the teacher's heads."""
        return head_kwargs(self.head, self.teacher_head, self.teacher_lm_head_weight)


@dataclass(frozen=True)
class ObjectiveOutput:
    """loss () fp32 to backpropagate; signal (N,) fp32 detached, the logged per-token statistic, valid where
    mask (N,) bool is set (the loss tokens) and 0 elsewhere."""

    loss: torch.Tensor
    signal: torch.Tensor
    mask: torch.Tensor


class Objective(ABC):
    """A training loss over `LossInputs`, computed without reading device values (no host synchronization).

    needs_teacher: the step runs the teacher pass and fills `teacher_hidden`. signal_name: what `signal` holds,
    the metric name of its mean ("mean_advantage", "mean_nll").
    """

    needs_teacher: bool = True
    signal_name: str = "mean_signal"

    @abstractmethod
    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        ...
