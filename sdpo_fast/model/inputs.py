"""What a packed pass reads of one interaction: its student and teacher token ids, and the sampler's log-probs
of its completion when known."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedInteraction:
    """Token ids of one interaction. The completion ids end both input id lists."""

    student_input_ids: list[int]
    teacher_input_ids: list[int]
    completion_ids: list[int]
    shared_prefix_len: int
    """Longest common prefix of the student and teacher prompt ids."""
    behavior_logprobs: list[float] | None = None
    """The sampler's log mu(y_t) of each completion token (aligned with completion_ids), for importance
    clipping; None when unknown."""

    @property
    def student_prompt_len(self) -> int:
        return len(self.student_input_ids) - len(self.completion_ids)

    @property
    def teacher_prompt_len(self) -> int:
        return len(self.teacher_input_ids) - len(self.completion_ids)
