"""Training objectives: what the training step calls on each micro-batch's hidden states.

One file per objective; `make_objective(name, **options)` builds one by name, `distillation_objective(mode, ...)`
the SDPO objective of a distillation mode from plain options (the offline and online configs' fields).
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


def distillation_objective(mode: str = "sampled_token", *, temperature: float = 1.0, alpha: float = 1.0,
                           topk: int = 100, add_tail: bool = True, signal_clip: float | None = None,
                           center_advantages: bool = False, importance_clip: float | None = None,
                           backend: str = "auto") -> Objective:
    """The SDPO objective of distillation_mode `mode`: sampled_token (the policy gradient; alpha must be 1,
    signal_clip and center_advantages apply), full_logits or topk_logits (alpha, and topk / add_tail for top-k)."""
    if mode not in DISTILLATION_OBJECTIVES:
        raise ValueError(f"distillation_mode must be one of {sorted(DISTILLATION_OBJECTIVES)}, got {mode!r}")
    if mode == "sampled_token":
        if alpha != 1:
            raise ValueError(f"distillation_alpha must be 1 with distillation_mode sampled_token, got {alpha!r}")
        return make_objective("sdpo", temperature=temperature, signal_clip=signal_clip,
                              center_advantages=center_advantages, importance_clip=importance_clip, backend=backend)
    for key, value in (("signal_clip", signal_clip is not None), ("center_advantages", center_advantages)):
        if value:
            raise ValueError(f"{key} applies to distillation_mode sampled_token only, not {mode}")
    options = dict(topk=topk, add_tail=add_tail) if mode == "topk_logits" else {}
    return make_objective(mode, alpha=alpha, temperature=temperature, importance_clip=importance_clip,
                          backend=backend, **options)


__all__ = ["DISTILLATION_OBJECTIVES", "DistillationObjective", "FullLogitObjective", "LossInputs", "OBJECTIVES",
           "Objective", "ObjectiveOutput", "SDPOObjective", "SFTObjective", "TopKLogitObjective", "distillation_objective",
           "make_objective"]
