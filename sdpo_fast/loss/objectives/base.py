"""The objective interface: one micro-batch's loss-token tensors in, a loss and a per-token signal out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..head import LogitHead, head_kwargs


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch, from the student and teacher passes (model/passes.py) to the objective; N = its
    completion tokens, d = hidden size.

    student_hidden (N, d) with grad; lm_head_weight (V, d); target_ids (N,) int64, IGNORE_INDEX where no loss;
    token_weights (N,) fp32, or None until the training step weighs the tokens; sequence_index (N,) int64 (the
    sequence each token belongs to); teacher_hidden (N, d_t) detached or None; teacher_lm_head_weight (V, d_t) or
    None (the teacher uses lm_head_weight); behavior_logprobs (N,) fp32 or None: the sampler's log mu(y_t), for
    importance clipping. head: the student model's logit head (its bias, scale and soft cap; None: none),
    teacher_head the teacher's own (None: the student's head, or teacher_lm_head_weight alone);
    position_in_completion (N,) int64 or None: each token's index in its completion.
    """

    student_hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    target_ids: torch.Tensor
    token_weights: torch.Tensor | None
    sequence_index: torch.Tensor
    teacher_hidden: torch.Tensor | None = None
    teacher_lm_head_weight: torch.Tensor | None = None
    behavior_logprobs: torch.Tensor | None = None
    head: LogitHead | None = None
    teacher_head: LogitHead | None = None
    position_in_completion: torch.Tensor | None = None

    def head_kwargs(self) -> dict:
        """The `sdpo_loss` keyword arguments of the student's and the teacher's heads."""
        return head_kwargs(self.head, self.teacher_head, self.teacher_lm_head_weight)

    loss_kwargs = head_kwargs  # the name SDPOBatch (model/passes.py) gave it


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
    mode: str = ""
    """The distillation_mode this objective serves ("" for none: SFT); see `register_mode`."""
    uses_advantages: bool = False
    """Its loss is the policy gradient on per-token advantages (signal_clip and center_advantages apply)."""

    @abstractmethod
    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        ...

    @classmethod
    def from_options(cls, **options) -> "Objective":
        """A registered mode's objective from the distillation options (temperature, alpha, topk, add_tail,
        signal_clip, center_advantages, importance_clip, backend), taking those it uses."""
        raise NotImplementedError(f"{cls.__name__} serves no distillation mode")


DISTILLATION_MODES: dict[str, type[Objective]] = {}
"""distillation_mode -> its objective class, filled by `register_mode`: the one list every layer asks."""


def register_mode(cls: type[Objective]) -> type[Objective]:
    """Class decorator: `cls` serves distillation_mode `cls.mode`; its `from_options(**distillation options)`
    builds it (a new mode = one objective file with this decorator, imported by the package)."""
    if not cls.mode or cls.mode in DISTILLATION_MODES:
        raise ValueError(f"distillation mode {cls.mode!r} is empty or registered twice")
    DISTILLATION_MODES[cls.mode] = cls
    return cls
