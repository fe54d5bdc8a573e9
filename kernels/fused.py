"""Every kernel launch of one fused-path loss step (forward of student and teacher, chunked backward), in order;
and of one distillation-mode (full_logits / topk_logits) step on the Triton backend; and the row kernels of the
grad-in-forward path (`loss.backends.gemm_sweep`), whose products are cuBLAS GEMMs.

The Triton backend launches exactly these (`backward_chunks` and the `*_launch` builders); the ahead-of-time check
and the traffic model build them on the `meta` device for a shape and a GPU, without a GPU.
"""
from __future__ import annotations

import torch

from .config import KernelConfig, backward_chunk_rows, divergence_chunk_rows, gemm_sweep_bytes_per_row
from .divergence import chunk_logits_launch
from .grad_logits import grad_logits_launch
from .grad_weight import grad_weight_launch
from .lse_gather import lse_gather_launch
from .row_divergence_grad import row_divergence_grad_launch
from .row_lse import row_lse_launch
from .row_token_grad import row_token_grad_launch


def backward_chunks(n_tokens: int, vocab_size: int, hidden_dim: int, dtype: torch.dtype,
                    need_weight: bool, l2_bytes: int = 0) -> list[slice]:
    """Row slices of the backward's chunks (one (rows, V) workspace reused by all)."""
    chunk = backward_chunk_rows(n_tokens, vocab_size, hidden_dim, dtype, need_weight, l2_bytes)
    return [slice(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]


def fused_step_launches(n_tokens: int, hidden_dim: int, vocab_size: int, dtype: torch.dtype,
                        cfgs: dict[str, KernelConfig], sm_count: int | None, need_weight: bool = True,
                        l2_bytes: int = 0, lse_programs_per_sm: int = 1) -> list[tuple[str, object]]:
    """(stage, Launch) of one forward+backward with a teacher, on meta tensors, each kernel at its config in cfgs
    (`config.kernel_configs`), for a GPU with sm_count SMs and l2_bytes of L2 on which lse_gather_kernel keeps
    lse_programs_per_sm programs per SM; stage is "forward" or "backward". grad_h = chunk @ W (cuBLAS) runs between
    grad_logits and grad_weight in each chunk."""
    meta = dict(device="meta")
    hidden = torch.empty(n_tokens, hidden_dim, dtype=dtype, **meta)
    weight = torch.empty(vocab_size, hidden_dim, dtype=dtype, **meta)
    targets = torch.empty(n_tokens, dtype=torch.int64, **meta)
    lse = torch.empty(n_tokens, dtype=torch.float32, **meta)
    launches = [("forward", lse_gather_launch(hidden, weight, targets, 1.0, cfgs["lse_gather"], sm_count, l2_bytes,
                                              lse_programs_per_sm)[0]) for _ in range(2)]
    chunks = backward_chunks(n_tokens, vocab_size, hidden_dim, dtype, need_weight, l2_bytes)
    workspace = torch.empty(chunks[0].stop - chunks[0].start, vocab_size, dtype=dtype, **meta)
    grad_weight = torch.empty(vocab_size, hidden_dim, dtype=torch.float32, **meta)
    for rows in chunks:
        chunk = workspace[: rows.stop - rows.start]
        launches.append(("backward", grad_logits_launch(hidden[rows], weight, targets[rows], lse[rows], lse[rows],
                                                        1.0, chunk, cfgs["grad_logits"])))
        if need_weight:
            launches.append(("backward", grad_weight_launch(chunk, hidden[rows], grad_weight, cfgs["grad_weight"],
                                                            rows.start > 0)))
    return launches


def divergence_step_launches(n_tokens: int, hidden_dim: int, vocab_size: int, dtype: torch.dtype,
                             cfgs: dict[str, KernelConfig], budget_bytes: int,
                             need_weight: bool = True) -> list[tuple[str, object]]:
    """(stage, Launch) of one distillation-mode step (`chunked_divergence.divergence_sweep` on the Triton backend),
    on meta tensors, each kernel at its config in cfgs: per chunk of `divergence_chunk_rows` rows, the student's and
    the teacher's chunk_logits into (rows, V) fp32 buffers, then grad_weight from the chunk's gradient w.r.t. the
    logits cast to `dtype` (the divergence and grad_hidden are PyTorch)."""
    meta = dict(device="meta")
    hidden, teacher_hidden = (torch.empty(n_tokens, hidden_dim, dtype=dtype, **meta) for _ in range(2))
    weight = torch.empty(vocab_size, hidden_dim, dtype=dtype, **meta)
    rows_per_chunk = divergence_chunk_rows(n_tokens, vocab_size, budget_bytes)
    student_buffer, teacher_buffer = (torch.empty(rows_per_chunk, vocab_size, dtype=torch.float32, **meta)
                                      for _ in range(2))
    grad_weight = torch.empty(vocab_size, hidden_dim, dtype=torch.float32, **meta)
    launches = []
    for start in range(0, n_tokens, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_tokens))
        n = rows.stop - start
        for buffer, rows_hidden in ((student_buffer, hidden[rows]), (teacher_buffer, teacher_hidden[rows])):
            launches.append(("forward", chunk_logits_launch(rows_hidden, weight, 1.0, buffer[:n],
                                                            cfgs["chunk_logits"])))
        if need_weight:
            grad = torch.empty(n, vocab_size, dtype=dtype, **meta)
            launches.append(("backward", grad_weight_launch(grad, hidden[rows], grad_weight, cfgs["grad_weight"],
                                                            True)))
    return launches


def grad_in_forward_launches(n_tokens: int, vocab_size: int, dtype: torch.dtype, budget_bytes: int,
                             topk: int = 100) -> list[tuple[str, object]]:
    """(mode, Launch) of the grad-in-forward path's row kernels on one chunk (rows: as many as budget_bytes holds),
    on meta tensors: the teacher's row_lse, sampled_token's row_token_grad (with importance clipping), and
    row_divergence_grad for full_logits (alpha 0.5) and topk_logits (alpha 1, the tail bucket). The chunk's GEMMs
    (logits, dX, dW) are cuBLAS."""
    from types import SimpleNamespace

    meta = dict(device="meta")
    launches = []
    for mode in ("sampled_token", "full_logits", "topk_logits"):
        k = topk if mode == "topk_logits" else 0
        rows = max(1, min(n_tokens, budget_bytes // gemm_sweep_bytes_per_row(mode, dtype.itemsize, vocab_size, k)))
        chunk = torch.empty(rows, vocab_size, dtype=dtype, **meta)
        targets = torch.empty(rows, dtype=torch.int64, **meta)
        vectors = [torch.empty(rows, dtype=torch.float32, **meta) for _ in range(5)]
        if mode == "sampled_token":
            launches.append((mode, row_lse_launch(chunk, targets, 1.0, *vectors[:2])))
            launches.append((mode, row_token_grad_launch(chunk, targets, *vectors[:5], 1.0, importance_clip=2.0)))
            continue
        spec = SimpleNamespace(mode=mode, alpha=0.5 if mode == "full_logits" else 1.0, add_tail=True)
        index = torch.empty(rows, k, dtype=torch.int64, **meta) if k else None
        launches.append((mode, row_divergence_grad_launch(chunk, torch.empty_like(chunk), vectors[0], targets,
                                                          vectors[1], vectors[2], index, *vectors[2:5], spec, 1.0,
                                                          1.0, importance_clip=2.0)))
    return launches
