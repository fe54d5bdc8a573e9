"""Teachers for the SDPO step: live (the current weights, the paper's choice), ema or base.

- live: the student's own weights; the teacher pass reuses the student's prefix K/V (no extra memory).
- base: the weights at the start of training. With LoRA, the adapter disabled (no copy); otherwise a frozen copy
  of the model (its parameter bytes once more).
- ema: theta_T <- (1 - rate) * theta_T + rate * theta_S after every optimizer step (TRL's and the authors'
  update; rate 0.05 by default), starting from the initial weights. With LoRA, a second copy of the adapter's
  trainable tensors, swapped in for the teacher pass (the adapter's bytes once more, plus the same again
  during the swap); otherwise a frozen copy of the model.

ema and base teachers run their own full pass (no prefix reuse: their weights differ from the student's).
`state_dict()` holds the teacher's own tensors (EMA, or the base copy) for checkpoints; `load_state_dict` restores
them bitwise.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..model import logit_head, teacher_hidden_states, unwrap_model
from ..utils import check_choice, check_number

TEACHERS = ("live", "ema", "base")


def _is_lora(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class Teacher:
    """The teacher of a run over `model` (kind: live, ema or base; ema_rate in (0, 1])."""

    def __init__(self, model, kind: str = "live", ema_rate: float = 0.05):
        check_choice("teacher", kind, TEACHERS)
        check_number("teacher_ema_rate", ema_rate, positive=True)
        if ema_rate > 1:
            raise ValueError(f"teacher_ema_rate must be in (0, 1], got {ema_rate!r}")
        self.model, self.kind, self.ema_rate = model, kind, float(ema_rate)
        self.lora = _is_lora(model)
        self.copy = None
        self.ema: dict[str, torch.Tensor] = {}
        if kind == "live" or (kind == "base" and self.lora):
            return
        if kind == "ema" and self.lora:
            self.ema = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
            return
        self.copy = copy.deepcopy(unwrap_model(model)).requires_grad_(False)

    @property
    def live(self) -> bool:
        return self.kind == "live"

    @contextlib.contextmanager
    def _weights(self):
        """The model whose forward is the teacher, with its weights in place."""
        if self.copy is not None:
            yield self.copy
        elif self.kind == "base":
            with self.model.disable_adapter():
                yield self.model
        else:
            params = dict(self.model.named_parameters())
            saved = {name: params[name].detach().clone() for name in self.ema}
            with torch.no_grad():
                for name, value in self.ema.items():
                    params[name].copy_(value)
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for name, value in saved.items():
                        params[name].copy_(value)

    def hidden_states(self, encoded, attn_backend: str = "auto"):
        """Full teacher pass over `encoded`: (hidden (N, d_t) detached, its `LogitHead`, or None when it is the
        student's). Run it before the student pass: the ema swap writes the adapter's tensors in place."""
        with self._weights() as teacher:
            hidden = teacher_hidden_states(teacher, encoded, attn_backend=attn_backend)
            head = None if self.copy is None else logit_head(teacher)
        return hidden, head

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: theta_T <- theta_T + rate * (theta_S - theta_T) for ema, nothing otherwise."""
        if self.kind != "ema":
            return
        if self.ema:
            for name, p in self.model.named_parameters():
                if name in self.ema:
                    self.ema[name].lerp_(p.detach(), self.ema_rate)
            return
        student = dict(unwrap_model(self.model).named_parameters())
        for name, p in self.copy.named_parameters():
            p.lerp_(student[name].detach(), self.ema_rate)

    def state_dict(self) -> dict:
        """The teacher's own tensors: the EMA's, or the base copy's (empty for live and the LoRA base teacher)."""
        if self.ema:
            return {name: t.clone() for name, t in self.ema.items()}
        if self.copy is not None:
            return {name: p.detach().clone() for name, p in self.copy.named_parameters()}
        return {}

    def load_state_dict(self, state: dict) -> None:
        target = self.ema or ({} if self.copy is None else dict(self.copy.named_parameters()))
        if set(state) != set(target):
            raise ValueError("teacher state does not match this teacher's parameters")
        with torch.no_grad():
            for name, value in state.items():
                target[name].copy_(value)
