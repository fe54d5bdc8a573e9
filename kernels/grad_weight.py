"""Backward, step 2: grad_weight (V, d) fp32 += grad_logits.T (V, n) @ hidden (n, d), accumulated in fp32.

Each program owns one (BLOCK_V, BLOCK_D) tile of grad_weight and reads-adds-writes it once (the first chunk
only writes), so the sum over chunks is deterministic (no atomics). Program order: hidden-dim block fastest, so the
programs resident at once share a few grad_logits column blocks, each streamed from HBM once per chunk.
"""
import torch
import triton
import triton.language as tl

from .config import KernelConfig, Launch, launch_config


@triton.jit
def grad_weight_kernel(
    grad_logits_ptr, hidden_ptr, grad_weight_ptr,
    n_tokens, vocab_size, hidden_dim,
    stride_gn, stride_gv, stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    d_blocks = tl.cdiv(hidden_dim, BLOCK_D)
    pid = tl.program_id(0)
    v0 = (pid // d_blocks).to(tl.int64) * BLOCK_V
    d0 = (pid % d_blocks).to(tl.int64) * BLOCK_D
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    v_mask = offs_v < vocab_size - v0
    d_mask = offs_d < hidden_dim - d0
    g_ptrs = grad_logits_ptr + v0 * stride_gv + (offs_k[None, :] * stride_gn + offs_v[:, None] * stride_gv)
    h_ptrs = hidden_ptr + d0 * stride_hd + (offs_k[:, None] * stride_hn + offs_d[None, :] * stride_hd)
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, n_tokens, BLOCK_K):
        k_mask = offs_k < n_tokens - k0
        g = tl.load(g_ptrs, mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        h = tl.load(h_ptrs, mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST_OPERANDS:
            g, h = g.to(tl.float32), h.to(tl.float32)
        acc = tl.dot(g, h, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_K * stride_gn
        h_ptrs += BLOCK_K * stride_hn
    out_ptrs = grad_weight_ptr + v0 * stride_wv + d0 * stride_wd + (offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd)
    out_mask = v_mask[:, None] & d_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


def launch_meta(cfg: KernelConfig) -> dict:
    """Compile-time arguments of grad_weight_kernel; fp32 (CUDA-core) tiles stay square to avoid spills."""
    block_d = cfg.block_d if cfg.input_precision == "ieee" else 2 * cfg.block_d
    return dict(BLOCK_V=cfg.block_v, BLOCK_D=block_d, BLOCK_K=cfg.block_d, INPUT_PRECISION=cfg.input_precision,
                UPCAST_OPERANDS=cfg.upcast_operands)


def grad_weight_launch(grad_logits, hidden, grad_weight, cfg: KernelConfig, accumulate: bool = True) -> Launch:
    """accumulate=False overwrites grad_weight (the first chunk: grad_weight may be uninitialized)."""
    n_tokens, hidden_dim = hidden.shape
    vocab_size = grad_logits.shape[1]
    meta = dict(launch_meta(cfg), ACCUMULATE=accumulate)
    return Launch(
        grad_weight_kernel, (triton.cdiv(vocab_size, meta["BLOCK_V"]) * triton.cdiv(hidden_dim, meta["BLOCK_D"]),),
        (grad_logits, hidden, grad_weight, n_tokens, vocab_size, hidden_dim,
         grad_logits.stride(0), grad_logits.stride(1), hidden.stride(0), hidden.stride(1),
         grad_weight.stride(0), grad_weight.stride(1)),
        dict(**meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def accumulate_grad_weight(grad_logits: torch.Tensor, hidden: torch.Tensor, grad_weight: torch.Tensor,
                           accumulate: bool = True, cfg: KernelConfig | None = None) -> None:
    """grad_logits (n, V) and hidden (n, d) in one float dtype; grad_weight (V, d) fp32, updated in place
    (overwritten when accumulate=False); cfg: the tile (default `launch_config`'s)."""
    cfg = cfg or launch_config(hidden.dtype, hidden.device, "grad_weight")
    grad_weight_launch(grad_logits, hidden, grad_weight, cfg, accumulate)()
