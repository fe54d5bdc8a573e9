"""Training objectives: what the training step calls on each micro-batch's hidden states.

One file per objective; `make_objective(name, **options)` builds one by name.
"""
from __future__ import annotations

from .base import LossInputs, Objective, ObjectiveOutput
from .distillation import DistillationObjective, FullLogitObjective, TopKLogitObjective
from .sdpo import SDPOObjective
from .sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {"sdpo": SDPOObjective, "sft": SFTObjective,
                                          "full_logits": FullLogitObjective, "topk_logits": TopKLogitObjective}
DISTILLATION_OBJECTIVES = {"sampled_token": "sdpo", "full_logits": "full_logits", "topk_logits": "topk_logits"}


def make_objective(name: str, **options) -> Objective:
    """The objective called `name` ("sdpo" (sampled_token), "full_logits", "topk_logits" or "sft") with its options
    (see each class); DISTILLATION_OBJECTIVES maps a distillation_mode to its objective's name."""
    if name not in OBJECTIVES:
        raise ValueError(f"loss must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**options)


__all__ = ["DISTILLATION_OBJECTIVES", "DistillationObjective", "FullLogitObjective", "LossInputs", "OBJECTIVES",
           "Objective", "ObjectiveOutput", "SDPOObjective", "SFTObjective", "TopKLogitObjective", "make_objective"]
