"""A (BLOCK_N, BLOCK_V) tile of hidden @ weight.T, accumulated in fp32 over the hidden dimension, and the logits the
head makes of it."""
import triton
import triton.language as tl


@triton.jit
def logits_tile(
    hidden_base, weight_base, n_valid, v_valid, hidden_dim,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    """hidden_base/weight_base point at the tile's first token/vocabulary row (64-bit addressing happens
    there, so in-tile offsets stay 32-bit); rows >= n_valid and columns >= v_valid read zeros."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_n < n_valid
    col_mask = offs_v < v_valid
    h_ptrs = hidden_base + (offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd)
    w_ptrs = weight_base + (offs_v[None, :] * stride_wv + offs_d[:, None] * stride_wd)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, hidden_dim, BLOCK_D):
        d_mask = offs_d < hidden_dim - d0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_OPERANDS:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def head_logits(raw, softcap, inv_temperature, HAS_CAP: tl.constexpr):
    """softcap * tanh(raw / softcap) * inv_temperature with HAS_CAP, else raw * inv_temperature (`loss.head`);
    tanh(x) = 1 - 2 / (exp(2x) + 1), which saturates to +-1 without overflow."""
    if HAS_CAP:
        return (1.0 - 2.0 / (tl.exp(2.0 * raw / softcap) + 1.0)) * (softcap * inv_temperature)
    return raw * inv_temperature
