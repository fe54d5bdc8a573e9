"""Teachers for the SDPO step: live (the current weights, the paper's choice), ema or base.

- live: the student's own weights; the teacher pass reuses the student's prefix K/V (no extra memory).
- base: the weights at the start of training. With LoRA, the adapter disabled (no copy); otherwise a frozen copy
  of the model (its parameter bytes once more).
- ema: theta_T <- (1 - rate) * theta_T + rate * theta_S after every optimizer step (TRL's and the authors'
  update; rate 0.05 by default), starting from the initial weights. The EMA is kept and stepped in fp32 towards
  the student's exact values (its fp32 master weights under bf16, train/precision.py): lerped in bf16, a step of
  rate * (theta_S - theta_T) below half a bf16 ulp rounds away and the teacher barely moves. With LoRA, an fp32
  copy of the adapter's trainable tensors, written (rounded to the adapter's dtype) into the adapter for the
  teacher pass and the student's values written back after it (4 bytes per adapter parameter, plus the
  adapter's own bytes during the swap); otherwise a frozen copy of the model in its dtype, which the teacher
  pass reads, set to the fp32 EMA's rounding after every update (plus 4 bytes per parameter for the fp32 EMA
  when the model is 16-bit).

ema and base teachers run their own full pass (no prefix reuse: their weights differ from the student's), as a
call of its own: under FSDP2, `hidden_states(..., run=root)` swaps the EMA in before the root's forward and back
after it, so the swap's in-place copies (default stream) come before the root's pre-forward, which orders
FSDP2's all-gather streams after them. `state_dict()` holds the teacher's own tensors (the fp32 EMA, or the base
copy) for checkpoints; `load_state_dict` restores them bitwise.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..model import logit_head, teacher_hidden_states, unwrap_model
from ..utils import check_choice, check_number
from .precision import fp32_value

TEACHERS = ("live", "ema", "base")


def _is_lora(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def _teacher_pass(model, encoded, attn_backend: str, own_head: bool):
    hidden = teacher_hidden_states(model, encoded, attn_backend=attn_backend)
    return hidden, logit_head(model) if own_head else None


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
        self.ema: dict[str, torch.Tensor] = {}  # name -> fp32 EMA
        if kind == "live" or (kind == "base" and self.lora):
            return
        if kind == "ema" and self.lora:
            self.ema = {name: fp32_value(p).clone() for name, p in model.named_parameters() if p.requires_grad}
            return
        self.copy = copy.deepcopy(unwrap_model(model)).requires_grad_(False)
        if kind == "ema":
            student = dict(unwrap_model(model).named_parameters())
            self.ema = {name: p if p.dtype == torch.float32 else fp32_value(student[name]).clone()
                        for name, p in self.copy.named_parameters()}

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
            saved = self._swap(self.ema)
            try:
                yield self.model
            finally:
                self._swap(saved)

    @torch.no_grad()
    def _swap(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `values` into the adapter's tensors of the same names (rounded to their dtype); returns the
        values they held."""
        params = dict(self.model.named_parameters())
        held = {name: params[name].detach().clone() for name in values}
        for name, value in values.items():
            params[name].copy_(value)
        return held

    def hidden_states(self, encoded, attn_backend: str = "auto", run=None):
        """Full teacher pass over `encoded`: (hidden (N, d_t) detached, its `LogitHead`, or None when it is the
        student's). run(fn, *args) runs fn(student model, *args) (default: directly; a `ShardedRoot`: inside its
        forward); an ema swap happens outside it. Run it before the student pass."""
        with self._weights() as teacher:
            if teacher is not self.model or run is None:
                return _teacher_pass(teacher, encoded, attn_backend, self.copy is not None)
            return run(_teacher_pass, encoded, attn_backend, False)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: theta_T <- theta_T + rate * (theta_S - theta_T) for ema, nothing otherwise."""
        if self.kind != "ema":
            return
        student = dict((unwrap_model(self.model) if self.copy is not None else self.model).named_parameters())
        for name, ema in self.ema.items():
            ema.lerp_(fp32_value(student[name]), self.ema_rate)
        self._round_copy()

    @torch.no_grad()
    def _round_copy(self) -> None:
        """The full copy the teacher pass reads set to the fp32 EMA's rounding (nothing when they are one)."""
        if self.copy is not None and self.ema:
            for name, p in self.copy.named_parameters():
                if p is not self.ema[name]:
                    p.copy_(self.ema[name])

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
        self._round_copy()
