"""Triton backend: fused forward (logits never written), chunked fused backward.

The backward writes one chunk's gradient w.r.t. the logits into one reused (chunk, V) workspace (its size:
`sdpo_fast.kernels.config.backward_chunk_rows`), never an (N, V) buffer.
"""
from __future__ import annotations

import torch

from ...kernels.config import triton_workspace_bytes
from ...kernels.divergence import chunk_logits
from ...kernels.fused import backward_chunks
from ...kernels.grad_logits import grad_logits
from ...kernels.grad_weight import accumulate_grad_weight
from ...kernels.lse_gather import lse_gather
from .chunked_divergence import divergence_sweep


def _inner_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels are specialized for a unit stride along the hidden dimension."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class TritonBackend:
    """The fused Triton backend (CUDA; CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    grad_in_forward = False

    def token_logprobs(self, hidden, weight, targets, inv_temperature: float):
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        if hidden.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
            return empty, empty
        lse, target_logit = lse_gather(hidden, weight, targets, inv_temperature)
        return target_logit - lse, lse

    def grad(self, hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool,
             need_weight: bool):
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        n_tokens = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        if n_tokens == 0:
            return grad_hidden, None if grad_weight is None else grad_weight.zero_()
        l2_bytes = getattr(torch.cuda.get_device_properties(hidden.device), "L2_cache_size", 0) \
            if hidden.is_cuda else 0
        chunks = backward_chunks(n_tokens, weight.shape[0], weight.shape[1], hidden.dtype, need_weight, l2_bytes)
        workspace = torch.empty((chunks[0].stop, weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
        for rows in chunks:
            grad_logits_chunk = workspace[: rows.stop - rows.start]
            grad_logits(hidden[rows], weight, targets[rows], lse[rows], coef[rows], inv_temperature,
                        grad_logits_chunk)
            if need_hidden:
                torch.mm(grad_logits_chunk, weight, out=grad_hidden[rows])
            if need_weight:
                accumulate_grad_weight(grad_logits_chunk, hidden[rows], grad_weight, accumulate=rows.start > 0)
        return grad_hidden, grad_weight

    def logprobs_and_grad(self, hidden, weight, targets, inv_temperature: float, coef_of, need_hidden: bool,
                          need_weight: bool):
        logprobs, lse = self.token_logprobs(hidden, weight, targets, inv_temperature)
        coef = coef_of(slice(None), logprobs)
        return (logprobs, *self.grad(hidden, weight, targets, lse, coef, inv_temperature, need_hidden, need_weight))

    def divergence(self, hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec,
                   inv_temperature: float, need_hidden: bool, need_weight: bool):
        """See `chunked_divergence.divergence_sweep`: logits chunks from the `chunk_logits` kernel, grad_weight
        from `accumulate_grad_weight`; workspace within SDPO_FAST_TRITON_WORKSPACE_MB."""
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        teacher_hidden, teacher_weight = _inner_contiguous(teacher_hidden), _inner_contiguous(teacher_weight)

        def add_grad_weight(grad, rows_hidden, out):
            accumulate_grad_weight(grad.to(rows_hidden.dtype), rows_hidden, out)

        return divergence_sweep(
            hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec, inv_temperature, need_hidden,
            need_weight, budget_bytes=triton_workspace_bytes(), logits_into=chunk_logits, add_grad_weight=add_grad_weight)
