"""The SFT baseline's loss: token-weighted cross entropy from hidden states, one chunk of logits alive at a time."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..constants import IGNORE_INDEX
from .reference import reference_logits

_SFT_CHUNK_BYTES = 32 << 20


def _nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias, scale, softcap) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(reference_logits(hidden, weight, 1.0, bias, scale, softcap).float(),
                                             targets, reduction="none", ignore_index=IGNORE_INDEX)


def sft_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, *,
             bias: torch.Tensor | None = None, scale: float = 1.0,
             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t w_t * -log softmax(z_t)[target_t] over targets != IGNORE_INDEX, z = softcap(scale * (hidden @ weight.T
    + bias)) (`reference.reference_logits`, the model's logits).

    hidden (N, d) and weight (V, d) one float dtype; bias (V,) or None; targets (N,) int64; token_weights (N,)
    fp32. Token chunks
    are activation-checkpointed, so no more than one chunk of logits is alive. Returns the fp32 loss and the
    detached per-token NLL (N,) fp32, 0 at ignored positions. Reads no device values (no host sync).
    """
    chunk = max(1, _SFT_CHUNK_BYTES // (4 * weight.shape[0]))
    loss, nlls = hidden.new_zeros((), dtype=torch.float32), []
    for s in range(0, targets.numel(), chunk):
        nll = activation_checkpoint(_nll, hidden[s:s + chunk], weight, targets[s:s + chunk], bias, scale, softcap,
                                    use_reentrant=False)
        loss = loss + (token_weights[s:s + chunk] * nll).sum()
        nlls.append(nll.detach())
    return loss, torch.cat(nlls) if nlls else hidden.new_zeros(0, dtype=torch.float32)
