"""Backward, step 1: the advantage-weighted gradient of the loss w.r.t. one chunk's logits.

G[n, v] = coef[n] * (softmax(z_n)[v] - [v == target_n]) * inv_temperature, with z = hidden @ weight.T *
inv_temperature recomputed tile by tile and softmax formed from the saved logsumexp; with a soft cap (`loss.head`)
z = c * tanh(hidden @ weight.T / c) * inv_temperature and G times the cap's slope 1 - tanh^2. Only this bounded
(chunk, V) workspace is written; the matrix products that consume it run next.
"""
import torch
import triton
import triton.language as tl

from .config import KernelConfig, Launch, launch_config, tile_meta as launch_meta
from .logits_tile import head_logits, logits_tile


@triton.jit
def grad_logits_kernel(
    hidden_ptr, weight_ptr, target_ptr, lse_ptr, coef_ptr, grad_ptr,
    n_tokens, vocab_size, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_gn,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, HAS_CAP: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_V
    n_valid = n_tokens - row0
    v_valid = vocab_size - col0
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    row_mask = offs_n < n_valid
    targets = tl.load(target_ptr + row0 + offs_n, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + row0 + offs_n, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + row0 + offs_n, mask=row_mask, other=0.0)
    logits = head_logits(logits_tile(
        hidden_ptr + row0 * stride_hn, weight_ptr + col0 * stride_wv, n_valid, v_valid, hidden_dim,
        stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, UPCAST_OPERANDS,
    ), softcap, inv_temperature, HAS_CAP)
    probs = tl.exp(logits - lse[:, None])
    onehot = offs_v[None, :] == (targets - col0).to(tl.int32)[:, None]
    grad = (coef * inv_temperature)[:, None] * tl.where(onehot, probs - 1.0, probs)
    if HAS_CAP:
        tanh = logits / (softcap * inv_temperature)
        grad = grad * (1.0 - tanh * tanh)
    grad_ptrs = grad_ptr + row0 * stride_gn + col0 + (offs_n[:, None] * stride_gn + offs_v[None, :])
    tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_v < v_valid)[None, :])


def grad_logits_launch(hidden, weight, targets, lse, coef, inv_temperature: float, out, cfg: KernelConfig, *,
                       softcap: float | None = None) -> Launch:
    n_tokens, hidden_dim = hidden.shape
    vocab_size = weight.shape[0]
    return Launch(
        grad_logits_kernel, (triton.cdiv(n_tokens, cfg.block_n), triton.cdiv(vocab_size, cfg.block_v)),
        (hidden, weight, targets, lse, coef, out, n_tokens, vocab_size, hidden_dim,
         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0), inv_temperature,
         1.0 if softcap is None else softcap),
        dict(**launch_meta(cfg), HAS_CAP=softcap is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def grad_logits(hidden, weight, targets, lse, coef, inv_temperature: float, out: torch.Tensor,
                softcap: float | None = None, cfg: KernelConfig | None = None) -> torch.Tensor:
    """hidden (n, d), weight (V, d), targets (n,) int64, lse and coef (n,) fp32; fills out (n, V) in place; cfg: the
    tile (default `launch_config`'s)."""
    cfg = cfg or launch_config(hidden.dtype, hidden.device, "grad_logits", softcap is not None)
    grad_logits_launch(hidden, weight, targets, lse, coef, inv_temperature, out, cfg, softcap=softcap)()
    return out
