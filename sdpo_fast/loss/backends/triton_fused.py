"""Triton backend: fused forward (logits never written), chunked fused backward.

The backward writes one chunk's gradient w.r.t. the logits into one reused (chunk, V) workspace (its size:
`sdpo_fast.kernels.config.backward_chunk_rows`), never an (N, V) buffer. A soft cap (`softcap`, see `loss.head`) is
applied inside the forward and backward kernels' tiles, and to each `chunk_logits` chunk in the logit modes.
"""
from __future__ import annotations

import torch

from ...kernels.config import gemm_sweep_bytes_per_row, l2_bytes, triton_workspace_bytes
from ...kernels.divergence import chunk_logits
from ...kernels.fused import backward_chunks
from ...kernels.grad_logits import grad_logits
from ...kernels.grad_weight import accumulate_grad_weight
from ...kernels.lse_gather import lse_gather
from ...kernels.row_divergence_grad import row_divergence_grad
from ...kernels.row_lse import row_lse
from ...kernels.row_token_grad import row_token_grad
from .chunked_divergence import divergence_sweep


def _vocab_slices(vocab_size: int, hidden_dim: int) -> list[slice]:
    """Vocabulary rows whose fp32 gradient fits SDPO_FAST_TRITON_WORKSPACE_MB (multiples of 128 rows)."""
    rows = max(128, triton_workspace_bytes() // (4 * hidden_dim) // 128 * 128)
    return [slice(start, min(start + rows, vocab_size)) for start in range(0, vocab_size, rows)]


def _fp32_grad_weight_fits(weight: torch.Tensor, workspace_bytes: int) -> bool:
    """Whether a 16-bit grad_W can be accumulated in fp32 in the sweep that forms grad_hidden: the fp32 (V, d)
    tensor, the 16-bit result and the (chunk, V) workspace fit in the device's free memory (the caching
    allocator's unused blocks included). Always on CPU. `sdpo-fast plan` counts the slice-by-slice path instead
    (train/plan.py): the least memory the step needs."""
    if not weight.is_cuda:
        return True
    free, _ = torch.cuda.mem_get_info(weight.device)
    free += torch.cuda.memory_reserved(weight.device) - torch.cuda.memory_allocated(weight.device)
    return (4 + weight.element_size()) * weight.numel() + workspace_bytes <= free


def _inner_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels are specialized for a unit stride along the hidden dimension."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class TritonBackend:
    """The fused Triton backend (CUDA; CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    @property
    def row_ops(self) -> "TritonRowOps":
        return TritonRowOps()

    @staticmethod
    def default_workspace_bytes() -> int:
        """SDPO_FAST_TRITON_WORKSPACE_MB (256 MiB)."""
        return triton_workspace_bytes()

    def token_logprobs(self, hidden, weight, targets, inv_temperature: float, softcap: float | None = None):
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        if hidden.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
            return empty, empty
        lse, target_logit = lse_gather(hidden, weight, targets, inv_temperature, softcap)
        return target_logit - lse, lse

    def grad(self, hidden, weight, targets, lse, coef, inv_temperature: float, need_hidden: bool,
             need_weight: bool, grad_weight_dtype: torch.dtype = torch.float32, softcap: float | None = None):
        """grad_weight accumulated in fp32 and returned in grad_weight_dtype, in the sweep that forms grad_hidden
        (10·N·d·V FLOPs with the forward). A 16-bit one whose fp32 accumulator does not fit in free memory
        (`_fp32_grad_weight_fits`) is formed in a second sweep instead, vocabulary slice by slice
        (`_vocab_slices`; the logits gradient formed again: 12·N·d·V), so no fp32 (V, d) tensor exists beside it."""
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        (n_tokens, hidden_dim), vocab_size = hidden.shape, weight.shape[0]
        device = hidden.device
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        if n_tokens == 0:
            grad_weight = torch.zeros(weight.shape, dtype=grad_weight_dtype, device=device) if need_weight else None
            return grad_hidden, grad_weight
        chunks = backward_chunks(n_tokens, vocab_size, hidden_dim, hidden.dtype, need_weight, l2_bytes(device))
        in_one_sweep = need_weight and (grad_weight_dtype == torch.float32 or _fp32_grad_weight_fits(
            weight, chunks[0].stop * vocab_size * hidden.element_size()))
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if in_one_sweep else None
        if need_hidden or in_one_sweep:
            workspace = torch.empty((chunks[0].stop, vocab_size), dtype=hidden.dtype, device=device)
            for rows in chunks:
                grad_logits_chunk = workspace[: rows.stop - rows.start]
                grad_logits(hidden[rows], weight, targets[rows], lse[rows], coef[rows], inv_temperature,
                            grad_logits_chunk, softcap)
                if need_hidden:
                    torch.mm(grad_logits_chunk, weight, out=grad_hidden[rows])
                if in_one_sweep:
                    accumulate_grad_weight(grad_logits_chunk, hidden[rows], grad_weight, accumulate=rows.start > 0)
            del workspace, grad_logits_chunk
        if need_weight and not in_one_sweep:
            grad_weight = torch.empty(weight.shape, dtype=grad_weight_dtype, device=device)
            slices = _vocab_slices(vocab_size, hidden_dim)
            workspace = torch.empty(chunks[0].stop * slices[0].stop, dtype=hidden.dtype, device=device)
            accumulator = torch.empty((slices[0].stop, hidden_dim), dtype=torch.float32, device=device)
            for vocab in slices:
                width = vocab.stop - vocab.start
                slice_targets = targets - vocab.start
                for rows in chunks:
                    chunk = workspace[: (rows.stop - rows.start) * width].view(rows.stop - rows.start, width)
                    grad_logits(hidden[rows], weight[vocab], slice_targets[rows], lse[rows], coef[rows],
                                inv_temperature, chunk, softcap)
                    accumulate_grad_weight(chunk, hidden[rows], accumulator[:width], accumulate=rows.start > 0)
                grad_weight[vocab].copy_(accumulator[:width])
        elif need_weight:
            grad_weight = grad_weight.to(grad_weight_dtype)
        return grad_hidden, grad_weight

    def divergence(self, hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec,
                   inv_temperature: float, need_hidden: bool, need_weight: bool, softcap: float | None = None,
                   teacher_inv_temperature: float | None = None, teacher_softcap: float | None = None):
        """See `chunked_divergence.divergence_sweep`: logits chunks from the `chunk_logits` kernel, grad_weight
        from `accumulate_grad_weight`; workspace within SDPO_FAST_TRITON_WORKSPACE_MB."""
        hidden, weight = _inner_contiguous(hidden), _inner_contiguous(weight)
        teacher_hidden, teacher_weight = _inner_contiguous(teacher_hidden), _inner_contiguous(teacher_weight)

        def add_grad_weight(grad, rows_hidden, out):
            accumulate_grad_weight(grad.to(rows_hidden.dtype), rows_hidden, out)

        return divergence_sweep(
            hidden, weight, teacher_hidden, teacher_weight, targets, coef_of, spec, inv_temperature, need_hidden,
            need_weight, budget_bytes=triton_workspace_bytes(), logits_into=chunk_logits, add_grad_weight=add_grad_weight,
            softcap=softcap, teacher_inv_temperature=teacher_inv_temperature, teacher_softcap=teacher_softcap)


class TritonRowOps:
    """`gemm_sweep.RowOps` as Triton row kernels (one program per row); the top-k support from torch.topk of the raw
    chunk (the head is increasing, so its order is the logits'); dW accumulated in fp32 by cuBLAS (`addmm` with an
    fp32 output on CUDA), by `accumulate_grad_weight` for a 16-bit chunk elsewhere (the interpreter)."""

    def bytes_per_row(self, mode: str, dtype: torch.dtype, vocab_size: int, topk: int, need_grad: bool,
                      softcap: bool) -> int:
        """`kernels.config.gemm_sweep_bytes_per_row`: the row kernels need nothing beside the chunks."""
        return gemm_sweep_bytes_per_row(mode, dtype.itemsize, vocab_size, topk)

    def teacher_rows(self, chunk, targets, inv_temperature: float, softcap):
        return row_lse(chunk, targets, inv_temperature, softcap)

    def token_rows(self, chunk, targets, teacher_lp, weights, behavior_lp, inv_temperature: float, *, softcap,
                   signal_clip, importance_clip, need_grad: bool):
        return row_token_grad(chunk, targets, teacher_lp, weights, behavior_lp, inv_temperature, softcap=softcap,
                              signal_clip=signal_clip, importance_clip=importance_clip, need_grad=need_grad)

    def divergence_rows(self, chunk, teacher_chunk, targets, weights, behavior_lp, spec, inv_temperature: float,
                        teacher_inv_temperature: float, *, softcap, teacher_softcap, importance_clip,
                        need_grad: bool):
        topk_index = torch.topk(chunk, spec.topk, dim=1).indices if spec.mode == "topk_logits" else None
        teacher_lse, teacher_target = row_lse(teacher_chunk, targets, teacher_inv_temperature, teacher_softcap)
        divergence, student_lp, coef = row_divergence_grad(
            chunk, teacher_chunk, teacher_lse, targets, weights, behavior_lp, topk_index, spec, inv_temperature,
            teacher_inv_temperature, softcap=softcap, teacher_softcap=teacher_softcap,
            importance_clip=importance_clip, need_grad=need_grad)
        return divergence, student_lp, teacher_target - teacher_lse, coef

    def add_grad_weight(self, grad, hidden, grad_weight) -> None:
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.T, hidden)
        elif grad.is_cuda:
            torch.addmm(grad_weight, grad.T, hidden, out_dtype=torch.float32, out=grad_weight)
        else:
            accumulate_grad_weight(grad, hidden, grad_weight)
