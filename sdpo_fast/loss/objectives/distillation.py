"""Logit distillation: the alpha-divergence of the student from the hindsight teacher over a support."""
from __future__ import annotations

from ...constants import IGNORE_INDEX
from ..api import sdpo_loss
from .base import LossInputs, Objective, ObjectiveOutput, register_mode


class DistillationObjective(Objective):
    """`sdpo_loss` in a logit mode; signal: the per-token divergence D_t. workspace_bytes: the loss's workspace
    budget, which picks its path (`sdpo_loss`)."""

    needs_teacher = True
    signal_name = "mean_divergence"
    mode = ""

    def __init__(self, *, alpha: float = 1.0, temperature: float = 1.0, importance_clip: float | None = None,
                 backend: str = "auto", workspace_bytes: int | None = None, **mode_options):
        self.alpha, self.temperature = alpha, temperature
        self.importance_clip, self.backend, self.workspace_bytes = importance_clip, backend, workspace_bytes
        self.mode_options = mode_options

    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        loss, stats = sdpo_loss(inputs.student_hidden, inputs.lm_head_weight, inputs.target_ids,
                                teacher_hidden=inputs.teacher_hidden, **inputs.head_kwargs(),
                                token_weights=inputs.token_weights, temperature=self.temperature,
                                distillation_mode=self.mode, distillation_alpha=self.alpha,
                                behavior_logprobs=inputs.behavior_logprobs, importance_clip=self.importance_clip,
                                backend=self.backend, return_stats=True, check_values=False, compact=False,
                                workspace_bytes=self.workspace_bytes, **self.mode_options)
        return ObjectiveOutput(loss, stats.divergence, inputs.target_ids != IGNORE_INDEX)


@register_mode
class FullLogitObjective(DistillationObjective):
    """Over the whole vocabulary (distillation_mode="full_logits")."""

    mode = "full_logits"

    @classmethod
    def from_options(cls, *, temperature, alpha, importance_clip, backend, workspace_bytes=None, **other_options):
        """The objective of the distillation options (signal_clip/center_advantages: None/False here)."""
        return cls(alpha=alpha, temperature=temperature, importance_clip=importance_clip, backend=backend,
                   workspace_bytes=workspace_bytes)

    def __init__(self, *, alpha: float = 1.0, temperature: float = 1.0, importance_clip: float | None = None,
                 backend: str = "auto", workspace_bytes: int | None = None):
        super().__init__(alpha=alpha, temperature=temperature, importance_clip=importance_clip, backend=backend,
                         workspace_bytes=workspace_bytes)


@register_mode
class TopKLogitObjective(DistillationObjective):
    """Over the student's top-k tokens, with a tail bucket or renormalized (distillation_mode="topk_logits")."""

    mode = "topk_logits"

    @classmethod
    def from_options(cls, *, temperature, alpha, topk, add_tail, importance_clip, backend, workspace_bytes=None,
                     **other_options):
        """The objective of the distillation options (signal_clip/center_advantages: None/False here)."""
        return cls(alpha=alpha, topk=topk, add_tail=add_tail, temperature=temperature,
                   importance_clip=importance_clip, backend=backend, workspace_bytes=workspace_bytes)

    def __init__(self, *, alpha: float = 1.0, topk: int = 100, add_tail: bool = True, temperature: float = 1.0,
                 importance_clip: float | None = None, backend: str = "auto", workspace_bytes: int | None = None):
        super().__init__(alpha=alpha, temperature=temperature, importance_clip=importance_clip, backend=backend,
                         workspace_bytes=workspace_bytes, distillation_topk=topk, distillation_add_tail=add_tail)
