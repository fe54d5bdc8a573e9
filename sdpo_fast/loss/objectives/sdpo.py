"""SDPO: -A_t * log pi(y_t) with A_t = log q - log pi from the hindsight teacher, optionally mean-centred."""
from __future__ import annotations

from ...constants import IGNORE_INDEX
from ..api import sdpo_loss
from ..divergence import POLICY_GRADIENT_MODE
from .base import LossInputs, Objective, ObjectiveOutput, register_mode


@register_mode
class SDPOObjective(Objective):
    """`sdpo_loss` over a micro-batch. center_advantages: per-sequence mean-centred advantages (the online loop's
    choice), computed inside the same `sdpo_loss` call. importance_clip: each token's term times
    min(exp(log pi - log mu), importance_clip) when the inputs carry behavior_logprobs. workspace_bytes: the loss's
    workspace budget, which picks its path (`sdpo_loss`). signal: the raw advantage log q - log pi per loss token."""

    needs_teacher = True
    signal_name = "mean_advantage"
    mode = POLICY_GRADIENT_MODE
    uses_advantages = True

    @classmethod
    def from_options(cls, *, temperature, signal_clip, center_advantages, importance_clip, backend,
                     workspace_bytes=None, **logit_options):
        """The objective of the distillation options (alpha, topk, add_tail serve the logit modes)."""
        return cls(temperature=temperature, signal_clip=signal_clip, center_advantages=center_advantages,
                   importance_clip=importance_clip, backend=backend, workspace_bytes=workspace_bytes)

    def __init__(self, *, temperature: float = 1.0, signal_clip: float | None = None,
                 center_advantages: bool = False, importance_clip: float | None = None, backend: str = "auto",
                 workspace_bytes: int | None = None):
        self.temperature, self.signal_clip = temperature, signal_clip
        self.center_advantages, self.backend = center_advantages, backend
        self.importance_clip, self.workspace_bytes = importance_clip, workspace_bytes

    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        loss, stats = sdpo_loss(inputs.student_hidden, inputs.lm_head_weight, inputs.target_ids,
                                teacher_hidden=inputs.teacher_hidden, **inputs.head_kwargs(),
                                token_weights=inputs.token_weights, temperature=self.temperature,
                                signal_clip=self.signal_clip, center_advantages=self.center_advantages,
                                sequence_index=inputs.sequence_index if self.center_advantages else None,
                                behavior_logprobs=inputs.behavior_logprobs, importance_clip=self.importance_clip,
                                backend=self.backend, return_stats=True, check_values=False, compact=False,
                                workspace_bytes=self.workspace_bytes)
        return ObjectiveOutput(loss, stats.teacher_logprobs - stats.student_logprobs,
                               inputs.target_ids != IGNORE_INDEX)
