"""Packed varlen attention, forward + backward, per backend (`sdpo_fast.model.attention.varlen_attention`).

Run: pytest benchmarks/test_attention_bench.py --benchmark-only
- CPU: the sdpa fallback at a small size (the only backend that runs there).
- CUDA: Qwen3-8B's heads (32 query, 8 K/V, head_dim 128), bf16, the teacher layout (8 suffixes of 2048 tokens over
  8 stored prefixes of 2048) on every backend this machine has: flash (flash-attn), torch (torch >= 2.10 varlen,
  GQA in one call) and sdpa (one call per sequence). TFLOP/s counts the causal attention's 4·D products per
  allowed (query, key) pair forward and 2.5 times that backward (dQ, dK, dV and the recomputed scores).
"""
from __future__ import annotations

import pytest
import torch

from sdpo_fast.model import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# device: (dtype, query heads, K/V heads, head_dim, sequences, suffix tokens, prefix tokens, rounds)
SETTINGS = {"cpu": (torch.float32, 4, 2, 32, 4, 128, 128, 3),
            "cuda": (torch.bfloat16, 32, 8, 128, 8, 2048, 2048, 10)}


def _inputs():
    dtype, heads, kv_heads, dim, n, suffix, prefix, _ = SETTINGS[DEVICE]
    g = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [suffix] * n, [prefix + suffix] * n
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k, v = (torch.randn(sum(lengths_k), kv_heads, dim, generator=g) for _ in range(2))
    q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))

    def cu(lengths):
        return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)

    pairs = n * (suffix * prefix + suffix * (suffix + 1) // 2)
    return (q, k, v, cu(lengths_q), cu(lengths_k), lengths_q, lengths_k), pairs * 4 * dim * heads * 3.5


@pytest.mark.parametrize("backend", ["flash", "torch", "sdpa"])
def test_varlen_attention_fwd_bwd(benchmark, backend):
    if backend != "sdpa":
        try:
            attention.check_backend(backend, torch.device(DEVICE), SETTINGS[DEVICE][0])
        except ValueError as exc:
            pytest.skip(str(exc))
    args, flops = _inputs()
    q, k, v = args[:3]
    grad = torch.randn_like(q)

    def step():
        out = attention.varlen_attention(*args, scale=q.shape[-1] ** -0.5, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"varlen attention {DEVICE}"
    benchmark.pedantic(step, rounds=SETTINGS[DEVICE][-1], warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(device=DEVICE, attn_backend=backend, heads=q.shape[1], kv_heads=k.shape[1],
                                tokens_q=q.shape[0], tokens_k=k.shape[0], flops=flops,
                                attention_tflops=flops / benchmark.stats.stats.median / 1e12)
