"""The options `TrainConfig` (offline) and `OnlineConfig` (online/config.py) share, each validated here once:
the objective and its teacher, the LoRA adapters, and the optimizer step. A config subclasses all three, so its
fields (YAML keys, flags) stay flat; a subclass restates a field to give it another default."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..loss.objectives import DISTILLATION_MODES, check_distillation_options, uses_advantages
from ..loss.validation import MIN_TEMPERATURE, check_topk_support
from ..utils.checks import check_bool, check_choice, check_int, check_number
from .setup import lora_config
from .teachers import TEACHERS

AUTO_SIGNAL_CLIP = 2.0
"""signal_clip "auto" for a mode on advantages (sampled_token): the authors' single-user live trainer's clamp."""


@dataclass
class StepSettings:
    """How one optimizer step runs: optimizer, micro-batches, loss tokens, passes and backends."""

    lr: float = 2e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 10.0
    ignore_first_k: int = 2
    """Reply tokens at the start left out of the loss."""
    micro_batch_tokens: int = 8192
    """Token budget of one packed forward (bounds activation memory)."""
    max_prompt_tokens: int = 2048
    seed: int = 0
    prefix_reuse: bool = True
    """The teacher pass reuses the student's K/V of the shared prompt prefix."""
    attn_backend: str = "auto"
    """auto, flash, torch or sdpa (packed varlen attention). flash (flash-attn) and torch (torch >= 2.10 varlen)
    need bf16/fp16 on a GPU of compute capability >= 8.0, refused otherwise before weights load; auto picks flash,
    then torch there, else sdpa."""
    loss_backend: str = "auto"
    """sdpo_loss backend: auto, triton, torch or reference."""
    loss_workspace_mb: int | None = None
    """The loss's workspace budget in MiB (None: the backend's default); it picks the loss path: gradients formed
    in the forward when a chunk of min(1024, loss tokens) rows fits, else the recompute kernels."""

    def validate_step(self) -> None:
        for key in ("micro_batch_tokens", "max_prompt_tokens"):
            check_int(key, getattr(self, key), 1)
        for key in ("ignore_first_k", "seed"):
            check_int(key, getattr(self, key), 0)
        check_int("loss_workspace_mb", self.loss_workspace_mb, 1, optional=True)
        check_number("lr", self.lr, positive=True)
        check_number("weight_decay", self.weight_decay)
        check_number("max_grad_norm", self.max_grad_norm, positive=True, optional=True)
        check_bool("prefix_reuse", self.prefix_reuse)


@dataclass
class ObjectiveOptions:
    """The SDPO objective (`build.objective_of`) and its hindsight teacher."""

    signal_clip: float | None = None
    """Clamp each token's advantage to +-this (None: off)."""
    temperature: float = 1.0
    importance_clip: float | None = None
    """Weight each token's loss by min(pi(y_t) / mu(y_t), this), mu the sampler's probability from the data's
    assistant "logprobs" (every interaction needs them; None: off)."""
    teacher: str = "live"
    """live (current weights, prefix K/V reused), ema or base (own teacher pass; see train/teachers.py)."""
    teacher_ema_rate: float = 0.05
    """EMA teacher: theta_T <- (1 - rate) theta_T + rate theta_S after each optimizer step."""
    distillation_mode: str = next(iter(DISTILLATION_MODES))
    """sampled_token (the SDPO policy gradient), full_logits or topk_logits (see sdpo_loss)."""
    distillation_alpha: float = 1.0
    """alpha-divergence of the logit modes: 0 forward KL, 1 reverse KL, 0.5 JSD (sampled_token needs 1)."""
    distillation_topk: int = 100
    distillation_add_tail: bool = True

    @property
    def resolved_signal_clip(self) -> float | None:
        """signal_clip with "auto" resolved (AUTO_SIGNAL_CLIP for a mode on advantages, None for the logit modes)."""
        if self.signal_clip == "auto":
            return AUTO_SIGNAL_CLIP if uses_advantages(self.distillation_mode) else None
        return self.signal_clip

    @property
    def resolved_center_advantages(self) -> bool:
        """Per-sequence mean-centred advantages: off unless a config has the option."""
        return False

    def validate_objective(self) -> None:
        check_choice("teacher", self.teacher, TEACHERS)
        check_int("distillation_topk", self.distillation_topk, 1)
        check_bool("distillation_add_tail", self.distillation_add_tail)
        check_topk_support(self.distillation_mode, self.distillation_topk, self.distillation_add_tail)
        for key in ("teacher_ema_rate", "distillation_alpha"):
            check_number(key, getattr(self, key), positive=key == "teacher_ema_rate")
            if getattr(self, key) > 1:
                raise ValueError(f"{key} must be at most 1, got {getattr(self, key)!r}")
        check_number("temperature", self.temperature, positive=True)
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (it is also the loss's temperature), "
                             f"got {self.temperature!r}")
        check_number("importance_clip", self.importance_clip, positive=True, optional=True)
        if self.signal_clip != "auto":
            check_number("signal_clip", self.signal_clip, positive=True, optional=True,
                         what="'auto', None (off) or a finite number > 0")
        check_distillation_options(self.distillation_mode, self.distillation_alpha,
                                   None if self.signal_clip == "auto" else self.signal_clip,
                                   getattr(self, "center_advantages", None))


@dataclass
class LoRAOptions:
    """LoRA adapters (peft); lora_r 0 trains every weight."""

    lora_r: int = 0
    """0: full fine-tuning."""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate_lora(self) -> None:
        check_int("lora_r", self.lora_r, 0)
        check_number("lora_alpha", self.lora_alpha, positive=True)
        check_number("lora_dropout", self.lora_dropout)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_target_modules
        if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                            and all(isinstance(t, str) and t for t in targets))):
            raise ValueError(f"lora_target_modules must be 'all-linear' or a non-empty list of module names, "
                             f"got {targets!r}")

    def lora_config(self):
        """The peft LoraConfig of these options."""
        return lora_config(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules)
