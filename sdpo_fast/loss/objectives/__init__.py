"""Training objectives: what the training step calls on each micro-batch's hidden states.

One file per objective. Each distillation mode's objective registers itself (`register_mode`) in
`DISTILLATION_MODES`, the one list of modes the configs, CLIs and integrations ask; `distillation_objective(mode,
...)` builds one from plain options (the offline and online configs' fields), `make_objective(name, **options)`
one by name.
"""
from __future__ import annotations

from ..validation import check_mode_options
from .base import DISTILLATION_MODES, LossInputs, Objective, ObjectiveOutput, register_mode
from .sdpo import SDPOObjective  # registered first: sampled_token leads DISTILLATION_MODES
from .distillation import DistillationObjective, FullLogitObjective, TopKLogitObjective
from .sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {"sdpo": SDPOObjective, "sft": SFTObjective,
                                          "full_logits": FullLogitObjective, "topk_logits": TopKLogitObjective}
DISTILLATION_OBJECTIVES = {mode: next(name for name, cls in OBJECTIVES.items() if cls is objective)
                           for mode, objective in DISTILLATION_MODES.items()}
"""distillation_mode -> its objective's name in OBJECTIVES."""


def make_objective(name: str, **options) -> Objective:
    """The objective called `name` ("sdpo" (sampled_token), "full_logits", "topk_logits" or "sft") with its options
    (see each class); DISTILLATION_OBJECTIVES maps a distillation_mode to its objective's name."""
    if name not in OBJECTIVES:
        raise ValueError(f"loss must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**options)


def check_distillation_options(mode: str, alpha: float, signal_clip=None, center_advantages=False) -> None:
    """ValueError unless `mode` is registered and the alpha/mode rule holds (`validation.check_mode_options`)."""
    if mode not in DISTILLATION_MODES:
        raise ValueError(f"distillation_mode must be one of {sorted(DISTILLATION_MODES)}, got {mode!r}")
    check_mode_options(mode, alpha, signal_clip, center_advantages)


def uses_advantages(mode: str) -> bool:
    """Whether `mode`'s objective is the policy gradient on advantages (signal_clip and center_advantages apply)."""
    return DISTILLATION_MODES[mode].uses_advantages


def distillation_objective(mode: str = "sampled_token", *, temperature: float = 1.0, alpha: float = 1.0,
                           topk: int = 100, add_tail: bool = True, signal_clip: float | None = None,
                           center_advantages: bool = False, importance_clip: float | None = None,
                           backend: str = "auto", workspace_bytes: int | None = None) -> Objective:
    """The SDPO objective of distillation_mode `mode`: sampled_token (the policy gradient; alpha must be 1,
    signal_clip and center_advantages apply), full_logits or topk_logits (alpha, and topk / add_tail for top-k).
    workspace_bytes: the loss's workspace budget (None: the backend's default), which picks its path."""
    check_distillation_options(mode, alpha, signal_clip, center_advantages)
    return DISTILLATION_MODES[mode].from_options(temperature=temperature, alpha=alpha, topk=topk, add_tail=add_tail,
                                                 signal_clip=signal_clip, center_advantages=center_advantages,
                                                 importance_clip=importance_clip, backend=backend,
                                                 workspace_bytes=workspace_bytes)


__all__ = ["DISTILLATION_MODES", "DISTILLATION_OBJECTIVES", "DistillationObjective", "FullLogitObjective",
           "LossInputs", "OBJECTIVES", "Objective", "ObjectiveOutput", "SDPOObjective", "SFTObjective",
           "TopKLogitObjective", "check_distillation_options", "distillation_objective", "make_objective",
           "register_mode", "uses_advantages"]
