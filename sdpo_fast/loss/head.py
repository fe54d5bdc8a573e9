"""The logit head of `sdpo_loss`: logits = softcap(scale * (h @ W.T + b)) / T with softcap(z) = c * tanh(z / c).

The backends compute softcap_c(h @ W.T) * inv_temperature (c None: no cap). Any head takes that form exactly:
softcap_c(s * u) / T = softcap_{c/s}(u) * s / T, so the scale folds into the cap and the final factor
(`head_softcap`, `head_inv_temperature`), and a bias becomes one more hidden column (ones) and one more weight column
(the bias), zero-padded to a multiple of 8 columns (16-byte rows for the kernels; `head_hidden`, `head_weight`,
differentiable tensor ops, so autograd returns the bias's gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COLUMN_MULTIPLE = 8


@dataclass(frozen=True)
class LogitHead:
    """What a model does to its hidden states to form logits: lm_head weight (V, d), its bias (V,) or None, the
    scale multiplied into the logits and the soft cap c of c * tanh(z / c) (None: none), applied in that order."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def loss_kwargs(self, role: str = "student") -> dict:
        """The `sdpo_loss` keyword arguments of this head as the student's or (role "teacher") the teacher's."""
        if role == "teacher":
            return dict(teacher_lm_head_weight=self.weight, teacher_lm_head_bias=self.bias,
                        teacher_logit_scale=self.scale, teacher_logit_softcap=self.softcap)
        return dict(lm_head_bias=self.bias, logit_scale=self.scale, logit_softcap=self.softcap)


def head_kwargs(head: LogitHead | None, teacher_head: LogitHead | None, teacher_lm_head_weight=None) -> dict:
    """The `sdpo_loss` keyword arguments of a student head and a teacher's own head (None: the teacher uses the
    student's, or teacher_lm_head_weight alone when given)."""
    kwargs = {} if head is None else head.loss_kwargs()
    if teacher_head is not None:
        return {**kwargs, **teacher_head.loss_kwargs("teacher")}
    return {**kwargs, "teacher_lm_head_weight": teacher_lm_head_weight}


def _extra_columns(hidden_dim: int) -> int:
    return COLUMN_MULTIPLE - hidden_dim % COLUMN_MULTIPLE


def head_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight (V, d) and bias (V,) -> [W, b, 0...] (V, d'); weight itself without a bias."""
    if bias is None:
        return weight
    zeros = torch.zeros((weight.shape[0], _extra_columns(weight.shape[1]) - 1), dtype=weight.dtype,
                        device=weight.device)
    return torch.cat([weight, bias[:, None], zeros], -1)


def head_hidden(hidden: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """hidden (n, d) -> [h, 1, 0...] (n, d') with a bias (the partner of `head_weight`), else hidden itself."""
    if not has_bias:
        return hidden
    ones = torch.zeros((hidden.shape[0], _extra_columns(hidden.shape[1])), dtype=hidden.dtype, device=hidden.device)
    ones[:, 0] = 1.0
    return torch.cat([hidden, ones], -1)


def head_inv_temperature(inv_temperature: float, scale: float) -> float:
    """The backends' final factor: scale / T."""
    return inv_temperature * scale


def head_softcap(scale: float, softcap: float | None) -> float | None:
    """The backends' cap on the unscaled products: c / scale (None: no cap)."""
    return None if softcap is None else softcap / scale


def soft_cap_(raw: torch.Tensor, softcap: float | None, inv_temperature: float) -> torch.Tensor:
    """softcap_c(raw) * inv_temperature in place on the fp32 products raw (n, V)."""
    if softcap is None:
        return raw.mul_(inv_temperature)
    return raw.div_(softcap).tanh_().mul_(softcap * inv_temperature)


def cap_slope(logits: torch.Tensor, softcap: float, inv_temperature: float, out: torch.Tensor) -> torch.Tensor:
    """d softcap_c(u) / du = 1 - tanh(u / c)^2 from the capped logits (n, V) fp32 (tanh = logits / (c *
    inv_temperature)), into out."""
    return torch.div(logits, softcap * inv_temperature, out=out).square_().neg_().add_(1.0)
