"""The sdpo_varlen attention: varlen backends against explicit per-sequence attention, the prefix K/V
cache, and the transformers registration (fallback to sdpa, switching and restoring)."""
from __future__ import annotations

import copy

import pytest
import torch

from sdpo_fast.model import attention
from sdpo_fast.model.attention import (
    ATTN_IMPLEMENTATION,
    enable_sdpo_attention,
    make_call,
    sdpo_attention,
    sdpo_varlen_attention,
    varlen_attention,
)
from sdpo_fast.model.prefix_cache import PrefixKVCache
from sdpo_fast.testing import tiny_causal_lm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def explicit_attention(q, k, v, lengths_q, lengths_k, scale):
    """Per sequence: softmax(q k^T * scale + bottom-right causal mask) v, in float64, GQA by repetition."""
    groups = q.shape[1] // k.shape[1]
    outs, sq, sk = [], 0, 0
    for nq, nk in zip(lengths_q, lengths_k):
        qi = q[sq:sq + nq].double().transpose(0, 1)
        ki = k[sk:sk + nk].double().repeat_interleave(groups, dim=1).transpose(0, 1)
        vi = v[sk:sk + nk].double().repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale
        allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))
        sq, sk = sq + nq, sk + nk
    return torch.cat(outs)


def cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def random_qkv(lengths_q, lengths_k, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=g)
    v = torch.randn(sum(lengths_k), kv_heads, dim, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


# (query lengths, key lengths): equal (student), longer keys (teacher suffix over a prefix), length 1.
LAYOUTS = [
    ([5, 1, 9], [5, 1, 9]),
    ([3, 1, 6], [10, 1, 6]),
    ([2, 7], [2 + 11, 7 + 4]),
]


@pytest.mark.parametrize("lengths_q, lengths_k", LAYOUTS)
def test_sdpa_varlen_matches_explicit_attention(lengths_q, lengths_k):
    q, k, v = random_qkv(lengths_q, lengths_k)
    out = varlen_attention(q, k, v, cu(lengths_q), cu(lengths_k), lengths_q, lengths_k, scale=0.3, backend="sdpa")
    expected = explicit_attention(q, k, v, lengths_q, lengths_k, 0.3)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_prefix_cache_stores_once_and_joins_per_sequence():
    layer = torch.nn.Linear(1, 1)
    cache = PrefixKVCache(prefix_lengths=[2, 0, 3], sequence_lengths=[4, 2, 3])
    key = torch.arange(9.0).view(9, 1, 1).expand(9, 2, 3).contiguous()
    cache.store(layer, key, -key)
    cache.store(layer, key + 100, key + 100)
    assert cache.is_stored(layer) and cache.num_prefix_tokens == 5

    suffix = torch.full((1 + 2 + 4, 2, 3), 50.0) + torch.arange(7.0).view(7, 1, 1)
    index = cache.join_index([1, 2, 4], "cpu")
    joined_key, joined_value = cache.join(layer, suffix, -suffix, index)
    # seq 0: prefix rows 0, 1 + suffix row 0; seq 1: suffix rows 1, 2; seq 2: prefix rows 6, 7, 8 + suffix 3..6
    expected = [0, 1, 50, 51, 52, 6, 7, 8, 53, 54, 55, 56]
    assert joined_key[:, 0, 0].tolist() == expected
    assert joined_value[:, 1, 2].tolist() == [-x for x in expected]


def test_prefix_cache_rejects_bad_use():
    with pytest.raises(ValueError, match="prefix_lengths"):
        PrefixKVCache([3], [2])
    cache = PrefixKVCache([1], [2])
    with pytest.raises(RuntimeError, match="student pass"):
        cache.join(torch.nn.Linear(1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), cache.join_index([1], "cpu"))
    with pytest.raises(ValueError, match="packed student rows"):
        cache.store(torch.nn.Linear(1, 1), torch.zeros(3, 1, 1), torch.zeros(3, 1, 1))


def to_hf(t):
    """(T, H, D) -> (1, H, T, D), the layout transformers hands to attention functions."""
    return t.transpose(0, 1).unsqueeze(0)


def test_teacher_call_attends_to_stored_prefix():
    """Student call on full sequences, then teacher call on suffixes: equals attention over the full keys."""
    module = torch.nn.Linear(1, 1)
    full, prefix = [6, 4], [4, 0]
    suffix = [n - p for n, p in zip(full, prefix)]
    q, k, v = random_qkv(full, full)
    cache = PrefixKVCache(prefix, full)
    student = make_call("student", full, torch.device("cpu"), backend="sdpa", prefix_cache=cache)
    sdpo_varlen_attention(module, to_hf(q), to_hf(k), to_hf(v), None, scaling=0.25, sdpo_call=student)
    keep = torch.cat([torch.arange(4, 6), torch.arange(6, 10)])
    teacher = make_call("teacher", suffix, torch.device("cpu"), backend="sdpa", prefix_cache=cache)
    out, weights = sdpo_varlen_attention(module, to_hf(q[keep]), to_hf(k[keep]), to_hf(v[keep]), None,
                                         scaling=0.25, sdpo_call=teacher)
    assert weights is None and out.shape == (1, sum(suffix), 4, 16)
    expected = explicit_attention(q, k, v, full, full, 0.25)[keep]
    torch.testing.assert_close(out[0].double(), expected, atol=1e-5, rtol=0)


def test_make_call_validates_arguments():
    cache = PrefixKVCache([1], [3])
    with pytest.raises(ValueError, match="mode"):
        make_call("bogus", [3], torch.device("cpu"))
    with pytest.raises(ValueError, match="attn_backend"):
        make_call("plain", [3], torch.device("cpu"), backend="bogus")
    with pytest.raises(ValueError, match="prefix_cache"):
        make_call("teacher", [3], torch.device("cpu"))
    with pytest.raises(ValueError, match="sequence_lengths"):
        make_call("student", [4], torch.device("cpu"), prefix_cache=cache)


@pytest.mark.skipif(attention._flash_varlen() is not None, reason="flash-attn is installed")
def test_flash_backend_without_flash_attn_is_rejected():
    with pytest.raises(ValueError, match="flash-attn"):
        attention.check_backend("flash")


def test_without_a_packed_call_the_model_attends_like_sdpa():
    """A model switched to sdpo_varlen but called normally (left-padded batch + mask) equals the sdpa model."""
    model = tiny_causal_lm("llama", initializer_range=0.2)
    switched = copy.deepcopy(model)
    assert enable_sdpo_attention(switched) == "sdpa"
    assert switched.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = switched(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_sdpo_attention_context_restores_the_implementation():
    model = tiny_causal_lm("qwen3")
    model.set_attn_implementation("eager")
    with sdpo_attention(model):
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_sdpo_attention(torch.nn.Linear(2, 2))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["torch", "flash"])
@pytest.mark.parametrize("lengths_q, lengths_k", LAYOUTS)
def test_cuda_backends_match_sdpa_in_bf16(backend, lengths_q, lengths_k):
    try:
        attention.check_backend(backend)
    except ValueError as exc:
        pytest.skip(str(exc))
    q, k, v = random_qkv(lengths_q, lengths_k, dim=64, dtype=torch.bfloat16, device="cuda")
    args = (cu(lengths_q, "cuda"), cu(lengths_k, "cuda"), lengths_q, lengths_k)
    out = varlen_attention(q, k, v, *args, scale=0.125, backend=backend)
    ref = varlen_attention(q, k, v, *args, scale=0.125, backend="sdpa")
    exact = explicit_attention(q.float(), k.float(), v.float(), lengths_q, lengths_k, 0.125)
    ref_error = (ref.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * ref_error + 1e-2
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def _fake_varlen(with_scale: bool, with_gqa: bool, calls: list):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with the signature of a given torch version, computed
    with the explicit attention (equal head counts unless enable_gqa, default scale unless given)."""
    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, enable_gqa=False, is_causal=True):
        assert is_causal and (enable_gqa or q.shape[1] == k.shape[1])
        calls.append(q.shape[1])
        lengths_q = (cu_q[1:] - cu_q[:-1]).tolist()
        lengths_k = (cu_k[1:] - cu_k[:-1]).tolist()
        return explicit_attention(q, k, v, lengths_q, lengths_k, q.shape[-1] ** -0.5 if scale is None else scale)

    if with_scale and with_gqa:
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False, is_causal=True: \
            run(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa, is_causal)
    if with_scale:
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=True: \
            run(q, k, v, cu_q, cu_k, max_q, max_k, scale, False, is_causal)
    return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=True: \
        run(q, k, v, cu_q, cu_k, max_q, max_k, None, False, is_causal)


@pytest.mark.parametrize("with_scale, with_gqa", [(False, False), (True, False), (True, True)],
                         ids=["torch-2.9-signature", "no-enable_gqa", "scale-and-gqa"])
def test_torch_varlen_signatures_give_the_same_attention(monkeypatch, with_scale, with_gqa):
    """Without a `scale` argument the scale is folded into q; without `enable_gqa` each query group runs over the
    shared K/V (never a repeated copy of K/V)."""
    calls = []
    fake = _fake_varlen(with_scale, with_gqa, calls)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake)
    monkeypatch.setattr(attention, "_torch_varlen_params", lambda: frozenset(
        __import__("inspect").signature(fake).parameters))
    lengths_q, lengths_k = [3, 1, 6], [10, 1, 6]
    q, k, v = random_qkv(lengths_q, lengths_k, heads=6, kv_heads=2)
    out = varlen_attention(q, k, v, cu(lengths_q), cu(lengths_k), lengths_q, lengths_k, scale=0.3, backend="torch")
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, lengths_q, lengths_k, 0.3), atol=1e-5,
                               rtol=0)
    assert calls == ([6] if with_gqa else [2, 2, 2])
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(explicit_attention(q, k, v, lengths_q, lengths_k, 0.3).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_fallback_never_uses_the_math_kernel_at_4k_tokens(dtype):
    """A teacher suffix over a long prefix (explicit mask) and GQA, fp32 and bf16, forward and backward at 4k keys:
    runs on a fused kernel (the fallback forbids the math one and would raise)."""
    lengths_q, lengths_k = [512, 1024], [2048 + 512, 1024 + 512]
    q, k, v = random_qkv(lengths_q, lengths_k, heads=8, kv_heads=2, dim=64, dtype=dtype, device="cuda")
    args = (cu(lengths_q, "cuda"), cu(lengths_k, "cuda"), lengths_q, lengths_k)
    out = varlen_attention(q, k, v, *args, scale=0.125, backend="sdpa")
    out.float().sum().backward()
    assert torch.isfinite(out).all() and q.grad is not None
