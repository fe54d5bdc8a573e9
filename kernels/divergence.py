"""Distillation modes: one chunk's temperature-scaled logits, (n, V) fp32, tile by tile into a bounded workspace.

The divergence over the chunk and its gradient w.r.t. the logits are formed from that workspace; grad_weight
reuses `grad_weight.accumulate_grad_weight` and grad_hidden cuBLAS.
"""
import torch
import triton
import triton.language as tl

from .config import KernelConfig, Launch, launch_config, tile_meta as launch_meta
from .logits_tile import logits_tile


@triton.jit
def chunk_logits_kernel(
    hidden_ptr, weight_ptr, out_ptr,
    n_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_on,
    inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_V
    n_valid = n_tokens - row0
    v_valid = vocab_size - col0
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    logits = logits_tile(
        hidden_ptr + row0 * stride_hn, weight_ptr + col0 * stride_wv, n_valid, v_valid, hidden_dim,
        stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, UPCAST_OPERANDS,
    ) * inv_temperature
    out_ptrs = out_ptr + row0 * stride_on + col0 + (offs_n[:, None] * stride_on + offs_v[None, :])
    tl.store(out_ptrs, logits, mask=(offs_n < n_valid)[:, None] & (offs_v < v_valid)[None, :])


def chunk_logits_launch(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float, out: torch.Tensor,
                        cfg: KernelConfig) -> Launch:
    """The launch filling out (n, V) fp32 with hidden (n, d) @ weight (V, d).T * inv_temperature."""
    n_tokens, hidden_dim = hidden.shape
    vocab_size = weight.shape[0]
    return Launch(
        chunk_logits_kernel, (triton.cdiv(n_tokens, cfg.block_n), triton.cdiv(vocab_size, cfg.block_v)),
        (hidden, weight, out, n_tokens, vocab_size, hidden_dim,
         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0), inv_temperature),
        dict(**launch_meta(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float, out: torch.Tensor) -> torch.Tensor:
    """hidden (n, d), weight (V, d) one float dtype, unit stride along d; fills out (n, V) fp32 (row-major rows)
    with hidden @ weight.T * inv_temperature and returns it."""
    if hidden.shape[0] == 0:
        return out
    cfg = launch_config(hidden.dtype, hidden.device, "chunk_logits")
    chunk_logits_launch(hidden, weight, inv_temperature, out, cfg)()
    return out
