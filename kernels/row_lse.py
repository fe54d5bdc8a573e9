"""Grad-in-forward path, teacher side: log-sum-exp and the target's logit of each row of a logits chunk that a GEMM
(cuBLAS) wrote, one program per row sweeping the vocabulary in BLOCK_V blocks; nothing is written back to the chunk.

Exponential sums are carried in fp64 (as the torch backend's): an fp32 sum over 10^5 terms loses ~1e-5.
The chunk holds raw products h @ W.T in the input dtype; the head (`loss.head`: soft cap, scale and temperature)
is applied as each block is read. `row_head_lse` is the shared sweep the student's row kernels start with.
"""
import torch
import triton
import triton.language as tl

from .config import Launch


@triton.jit
def expm1_nonpositive(x):
    """exp(x) - 1 for x <= 0 without the cancellation near 0 (Taylor to x^7 above -0.25)."""
    series = x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0 * (
        1.0 + x / 7.0))))))
    return tl.where(x > -0.25, series, tl.exp(x) - 1.0)


@triton.jit
def head_logits(raw, softcap, inv_temperature, HAS_CAP: tl.constexpr):
    """softcap * tanh(raw / softcap) * inv_temperature with HAS_CAP, else raw * inv_temperature (`loss.head`);
    tanh(x) = sign(x) * -expm1(-2|x|) / (1 + exp(-2|x|)), accurate to fp32 rounding near 0 (the tiles'
    1 - 2 / (exp(2x) + 1) is not, and a logit modes' divergence of 1e-2 notices)."""
    if HAS_CAP:
        x = raw / softcap
        e = -2.0 * tl.abs(x)
        tanh = -expm1_nonpositive(e) / (1.0 + tl.exp(e))
        return tl.where(x < 0, -tanh, tanh) * (softcap * inv_temperature)
    return raw * inv_temperature


@triton.jit
def row_head_lse(row_ptr, target, vocab_size, inv_temperature, softcap, BLOCK_V: tl.constexpr,
                 HAS_CAP: tl.constexpr):
    """(log-sum-exp, logit at `target`) of one row's head logits, fp32 scalars, online over BLOCK_V blocks."""
    offs_v = tl.arange(0, BLOCK_V)
    running_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_V], dtype=tl.float64)
    target_logit = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, vocab_size, BLOCK_V):
        cols = v0 + offs_v
        valid = cols < vocab_size
        raw = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        logits = tl.where(valid, head_logits(raw, softcap, inv_temperature, HAS_CAP), float("-inf"))
        new_max = tl.maximum(running_max, logits)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(logits - safe_max).to(tl.float64)
        running_max = new_max
        target_logit += tl.where(cols == target, logits, 0.0)
    row_max = tl.max(running_max, axis=0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max).to(tl.float64), axis=0)
    return row_max + tl.log(total.to(tl.float32)), tl.sum(target_logit, axis=0)


@triton.jit
def row_lse_kernel(logits_ptr, target_ptr, lse_ptr, target_logit_ptr, vocab_size, stride_n, inv_temperature, softcap,
                   BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    lse, target_logit = row_head_lse(logits_ptr + row * stride_n, target, vocab_size, inv_temperature, softcap,
                                     BLOCK_V, HAS_CAP)
    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, target_logit)


def row_meta(device: torch.device) -> dict:
    """BLOCK_V and warps of the row kernels: 2048-wide blocks over 8 warps on a GPU (8 fp32 values a thread per
    vector; the `meta` tensors of `kernels.check` too); 128 under the interpreter (CPU tensors), so that small test
    vocabularies span several blocks."""
    if device.type == "cpu":
        return dict(BLOCK_V=128, num_warps=4, num_stages=1)
    return dict(BLOCK_V=2048, num_warps=8, num_stages=1)


def row_lse_launch(logits, targets, inv_temperature: float, lse, target_logit, *,
                   softcap: float | None = None) -> Launch:
    """logits (n, V) any float dtype, unit column stride; targets (n,) int64; fills lse and target_logit (n,) fp32."""
    return Launch(row_lse_kernel, (logits.shape[0],),
                  (logits, targets, lse, target_logit, logits.shape[1], logits.stride(0), inv_temperature,
                   1.0 if softcap is None else softcap),
                  dict(**row_meta(logits.device), HAS_CAP=softcap is not None))


def row_lse(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, softcap: float | None = None):
    """(lse, target_logit), (n,) fp32 each, of the head logits of the raw rows `logits` (n, V)."""
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    if logits.shape[0]:
        row_lse_launch(logits, targets, inv_temperature, lse, target_logit, softcap=softcap)()
    return lse, target_logit
