"""`OnlineConfig`: the online loop's options (the step, objective and LoRA options shared with `TrainConfig`, see
train/options.py, with the online defaults), merged from defaults < preset < YAML file < flags, then validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..train.config import check_keys, coerce_floats, field_names
from ..loss.objectives import uses_advantages
from ..train.options import LoRAOptions, ObjectiveOptions, StepSettings
from ..utils.checks import check_bool, check_choice, check_int

PRESETS: dict[str, dict[str, Any]] = {
    # Paper Table 5 (personalization) and the authors' online trainers (see shared/ANCHORS.md).
    # center_advantages / signal_clip: their defaults resolve to the authors' (on, 2.0) in sampled_token mode.
    "paper-personalization": dict(update_every=16, lr=5e-6, max_new_tokens=258, temperature=1.0, lora_r=64,
                                  lora_alpha=128.0),
}


@dataclass
class OnlineConfig(StepSettings, ObjectiveOptions, LoRAOptions):
    """Options of the online loop; `validate()` names the offending field."""

    update_every: int = 16
    """k: interactions per SDPO update (the batch)."""
    lr: float = 5e-6
    """Constant learning rate (AdamW)."""
    max_grad_norm: float | None = None
    center_advantages: bool | None = None
    """Per-sequence mean-centred advantages (sampled_token only). None: on for sampled_token (the authors' online
    trainer), off for the logit modes."""
    signal_clip: float | str | None = "auto"
    """Clamp each token's advantage to +-this (sampled_token only; None: off). "auto": 2.0 for sampled_token,
    off for the logit modes."""
    ignore_first_k: int = 0
    temperature: float = 1.0
    """Sampling temperature of the policy, and the temperature of the loss's log-probs."""
    max_new_tokens: int = 258
    lora_r: int = 64
    """0: update all weights (single-user policies only)."""
    lora_alpha: float = 128.0
    lora_target_modules: str | list[str] = "all-linear"
    teacher: str = "live"
    """live (current weights, prefix K/V reused), ema or base (own teacher pass; see train/teachers.py). With LoRA
    the teacher is the policy's own adapter: base = adapter disabled, ema = an EMA of that adapter's tensors."""
    teacher_ema_rate: float = 0.05
    """EMA teacher: theta_T <- (1 - rate) theta_T + rate theta_S after each update."""
    seed: int = 0
    """Seed of LoRA initialization, sampling and prompts."""
    importance_clip: float | None = None
    """Weight each token's loss by min(pi(y_t) / mu(y_t), this), mu the probability the sampler drew y_t with
    (recorded at sampling; None: off)."""

    # The online loop's fixed choices (`train.build` reads them as it reads TrainConfig's fields): the SDPO
    # objective, each interaction weighed equally (mean over its loss tokens, then over the update's), and plain
    # AdamW at a constant learning rate.
    loss: ClassVar[str] = "sdpo"
    aggregation: ClassVar[str] = "sequence"
    optimizer: ClassVar[str] = "adamw"
    optimizer_in_backward: ClassVar[bool] = False
    offload_optimizer: ClassVar[bool] = False
    schedule: ClassVar[str] = "constant"
    warmup_ratio: ClassVar[float] = 0.0

    @property
    def resolved_center_advantages(self) -> bool:
        """center_advantages with None resolved (True for sampled_token, False for the logit modes)."""
        if self.center_advantages is None:
            return uses_advantages(self.distillation_mode)
        return self.center_advantages

    def validate(self) -> "OnlineConfig":
        for key in ("update_every", "max_new_tokens"):
            check_int(key, getattr(self, key), 1)
        self.validate_step()
        if self.ignore_first_k > self.max_new_tokens:
            raise ValueError(f"ignore_first_k {self.ignore_first_k} > max_new_tokens {self.max_new_tokens} trains "
                             "nothing (a completion has at most max_new_tokens + 1 tokens, the end of turn included, "
                             "and all are left out of the loss); lower ignore_first_k")
        self.validate_lora()
        if self.center_advantages is not None:
            check_bool("center_advantages", self.center_advantages)
        self.validate_objective()
        return self

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {name: values[name] for name in field_names(OnlineConfig)}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OnlineConfig":
        """A config from PRESETS[name], with `overrides` on top."""
        return resolve_online_config(overrides=overrides, preset=name)


def resolve_online_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, *,
                          preset: str | None = None, defaults: dict[str, Any] | None = None) -> OnlineConfig:
    """OnlineConfig defaults < `defaults` (e.g. the demo's settings) < PRESETS[preset] < file values (a YAML
    mapping of field names, see `train.config.load_yaml`) < `overrides` (the flags given); validated. Unknown keys
    are rejected with the list of valid ones."""
    file_values, overrides = dict(file_values or {}), dict(overrides or {})
    check_keys(OnlineConfig, file_values, "config file")
    check_keys(OnlineConfig, overrides, "OnlineConfig")
    merged = dict(defaults or {})
    if preset is not None:
        check_choice("preset", preset, tuple(PRESETS))
        merged.update(PRESETS[preset])
    merged.update(file_values)
    merged.update(overrides)
    return OnlineConfig(**coerce_floats(OnlineConfig, merged)).validate()
