"""SFT, the paper's baseline: cross entropy on the logged replies; no teacher pass."""
from __future__ import annotations

from ...constants import IGNORE_INDEX
from ..sft import sft_loss
from .base import LossInputs, Objective, ObjectiveOutput


class SFTObjective(Objective):
    """Token-weighted NLL of the completion tokens; signal: the per-token NLL."""

    needs_teacher = False
    signal_name = "mean_nll"

    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        head = inputs.head
        options = {} if head is None else dict(bias=head.bias, scale=head.scale, softcap=head.softcap)
        loss, nll = sft_loss(inputs.student_hidden, inputs.lm_head_weight, inputs.target_ids, inputs.token_weights,
                             **options)
        return ObjectiveOutput(loss, nll, inputs.target_ids != IGNORE_INDEX)
