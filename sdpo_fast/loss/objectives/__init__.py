"""Training objectives: what the training step calls on each micro-batch's hidden states.

One file per objective; `make_objective(name, **options)` builds one by name.
"""
from __future__ import annotations

from .base import LossInputs, Objective, ObjectiveOutput
from .sdpo import SDPOObjective
from .sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {"sdpo": SDPOObjective, "sft": SFTObjective}


def make_objective(name: str, **options) -> Objective:
    """The objective called `name` ("sdpo" or "sft") with its options (see each class)."""
    if name not in OBJECTIVES:
        raise ValueError(f"loss must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**options)


__all__ = ["LossInputs", "OBJECTIVES", "Objective", "ObjectiveOutput", "SDPOObjective", "SFTObjective",
           "make_objective"]
