"""The sdpo_varlen attention: varlen backends against explicit per-sequence attention, the prefix K/V
cache, and the transformers registration (fallback to sdpa, switching and restoring)."""
from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

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


def _stand_in(version: str, calls: list):
    """torch.nn.attention.varlen.varlen_attn with the signature of torch `version` ("2.10": positional `is_causal`,
    no `scale`; "2.11": keyword-only `scale` and `window_size`), computed with the explicit attention. Like the
    FlashAttention-2 kernel behind both, it takes fewer K/V heads than query heads when they divide them; each call
    records (query heads, K/V heads)."""
    def run(q, k, v, cu_q, cu_k, scale, causal):
        assert causal and q.shape[1] % k.shape[1] == 0
        calls.append((q.shape[1], k.shape[1]))
        lengths_q, lengths_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        out = explicit_attention(q, k, v, lengths_q, lengths_k, q.shape[-1] ** -0.5 if scale is None else scale)
        return out.to(q.dtype)

    if version == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, None, is_causal)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            return run(query, key, value, cu_seq_q, cu_seq_k, scale, tuple(window_size) == (-1, 0))
    return varlen_attn


def _use_stand_in(monkeypatch, version: str) -> list:
    """Route attn_backend 'torch' to the stand-in on this CPU (whose device check would refuse it)."""
    calls = []
    fake = _stand_in(version, calls)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake)
    monkeypatch.setattr(attention, "_torch_varlen_params", lambda: frozenset(inspect.signature(fake).parameters))
    monkeypatch.setattr(attention, "varlen_refusal", lambda device, dtype=None: None)
    return calls


@pytest.mark.parametrize("version", ["2.10", "2.11"])
def test_torch_varlen_signatures_give_the_same_attention_in_one_gqa_call(monkeypatch, version):
    """Without a `scale` argument (2.10) the scale is folded into q; GQA runs as one call on the un-repeated
    K/V heads."""
    calls = _use_stand_in(monkeypatch, version)
    lengths_q, lengths_k = [3, 1, 6], [10, 1, 6]
    q, k, v = random_qkv(lengths_q, lengths_k, heads=6, kv_heads=2)
    out = varlen_attention(q, k, v, cu(lengths_q), cu(lengths_k), lengths_q, lengths_k, scale=0.3, backend="torch")
    expected = explicit_attention(q, k, v, lengths_q, lengths_k, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert calls == [(6, 2)]
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_torch_backend_runs_one_gqa_call_per_layer_of_a_model(monkeypatch):
    """A packed forward of a 3-layer GQA model (4 query, 2 K/V heads) on attn_backend 'torch': one kernel call per
    layer with the model's own K/V head count, and the same hidden states as the sdpa backend."""
    calls = _use_stand_in(monkeypatch, "2.11")
    model = tiny_causal_lm("qwen3", num_layers=3, initializer_range=0.2)
    lengths = [5, 9, 2]
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    hidden = {}
    with sdpo_attention(model), attention.packed_forward(), torch.no_grad():
        for backend in ("torch", "sdpa"):
            call = make_call("plain", lengths, torch.device("cpu"), backend=backend)
            hidden[backend] = model.model(ids, position_ids=positions, sdpo_call=call).last_hidden_state
            assert call.attention_calls == 3
    assert calls == [(4, 2)] * 3
    torch.testing.assert_close(hidden["torch"], hidden["sdpa"], atol=1e-5, rtol=1e-5)


def test_explicit_varlen_backends_are_refused_where_their_kernel_cannot_run(monkeypatch):
    """flash/torch need fp16/bf16 on a CUDA GPU of compute capability >= 8.0: refused when chosen (device and
    dtype known, before weights load) in one line naming sdpa; auto picks sdpa there."""
    monkeypatch.setattr(attention, "_torch_varlen", lambda: _stand_in("2.11", []))
    monkeypatch.setattr(attention, "_flash_varlen", lambda: object())
    capability = {"cuda:0": (7, 5), "cuda:1": (8, 0)}
    monkeypatch.setattr(attention, "_capability", lambda device: capability[str(device)])
    cases = [("cpu", torch.bfloat16, "CUDA GPUs only"), ("cuda:1", torch.float32, "fp16/bf16 inputs only, not float32"),
             ("cuda:0", torch.bfloat16, "compute capability >= 8.0, cuda:0 has 7.5")]
    for backend in ("flash", "torch"):
        for device, dtype, why in cases:
            with pytest.raises(ValueError, match=f"attn_backend='{backend}' cannot run here: .*{why}.*'sdpa'") as exc:
                attention.check_backend(backend, torch.device(device), dtype)
            assert "\n" not in str(exc.value)
        attention.check_backend(backend, torch.device("cuda:1"), torch.bfloat16)
        attention.check_backend(backend, torch.device("cuda:1"))
        with pytest.raises(ValueError, match="compute capability"):
            attention.check_backend(backend, torch.device("cuda:0"))
    for device, dtype, _ in cases:
        assert attention.resolve_backend("auto", SimpleNamespace(device=torch.device(device), dtype=dtype), 0.0) \
            == "sdpa"
    query = SimpleNamespace(device=torch.device("cuda:1"), dtype=torch.bfloat16)
    assert attention.resolve_backend("auto", query, 0.0) == "flash"


def test_varlen_attention_refuses_mixed_dtypes_and_cpu_varlen_backends():
    q, k, v = random_qkv([3], [3])
    args = (cu([3]), cu([3]), [3], [3])
    with pytest.raises(ValueError, match="one dtype"):
        varlen_attention(q, k.double(), v, *args, backend="sdpa")
    if attention._torch_varlen() is not None:
        with pytest.raises(ValueError, match="attn_backend='torch' cannot run here: they run on CUDA GPUs only"):
            varlen_attention(q, k, v, *args, backend="torch")


def test_mixed_dtypes_under_autocast_are_cast_as_autocast_casts_sdpa():
    """Under torch.autocast(bf16), Qwen3's normed q and k arrive in fp32 beside a bf16 v: the packed call equals
    torch's own SDPA under the same autocast (which casts its inputs to bf16)."""
    q, k, v = random_qkv([5], [5], heads=2, kv_heads=2)
    v = v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = varlen_attention(q, k, v, cu([5]), cu([5]), [5], [5], backend="sdpa")
        plain = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True)
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain[0].transpose(0, 1), atol=0, rtol=0)


def test_train_config_refuses_a_varlen_backend_before_loading_weights(monkeypatch):
    """The trainer's choice-time check: dtype float32 with attn_backend 'torch' names sdpa."""
    from sdpo_fast.train.config import TrainConfig
    from sdpo_fast.train.preflight import check_backends

    monkeypatch.setattr(attention, "_torch_varlen", lambda: _stand_in("2.11", []))
    with pytest.raises(ValueError, match="attn_backend='torch' cannot run here: they run on CUDA GPUs only, not "
                                         "cpu; use attn_backend='sdpa'"):
        check_backends(TrainConfig(device="cpu", dtype="float32", attn_backend="torch"))
    check_backends(TrainConfig(device="cpu", dtype="float32", attn_backend="sdpa"))
    from sdpo_fast.cli.online import _check_attn_backend

    with pytest.raises(ValueError, match="attn_backend='torch' cannot run here"):
        _check_attn_backend("torch", "cpu")


def test_a_pass_refuses_a_varlen_backend_before_any_forward(monkeypatch):
    """forward_micro_batch on a CPU model with attn_backend 'torch': refused from the model's device before a layer
    runs."""
    from sdpo_fast.data import EncodedInteraction
    from sdpo_fast.model import forward_micro_batch

    monkeypatch.setattr(attention, "_torch_varlen", lambda: _stand_in("2.11", []))
    model = tiny_causal_lm("qwen3")
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    encoded = [EncodedInteraction([5, 6, 7, 40, 41], [5, 6, 9, 40, 41], [40, 41], 2)]
    with pytest.raises(ValueError, match="attn_backend='torch' cannot run here: they run on CUDA GPUs only"):
        forward_micro_batch(model, encoded, attn_backend="torch")
    assert calls == []
    forward_micro_batch(model, encoded, attn_backend="sdpa")
    assert calls == [1, 1]


@pytest.mark.cuda
@cuda
def test_cuda_torch_varlen_gqa_is_one_call_matching_sdpa(monkeypatch):
    """On a GPU with torch >= 2.10: the real kernel takes 8 query over 2 K/V heads in one call, forward and
    backward agree with the sdpa fallback (bf16, teacher layout), and a float32 call is refused before the kernel."""
    if attention._torch_varlen() is None:
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    if attention.varlen_refusal(torch.device("cuda"), torch.bfloat16) is not None:
        pytest.skip(attention.varlen_refusal(torch.device("cuda"), torch.bfloat16))
    real, calls = attention._torch_varlen(), []

    def counted(q, k, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1]))
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(attention, "_torch_varlen", lambda: counted)
    lengths_q, lengths_k = [100, 37], [300, 37]
    q, k, v = random_qkv(lengths_q, lengths_k, heads=8, kv_heads=2, dim=128, dtype=torch.bfloat16, device="cuda")
    args = (cu(lengths_q, "cuda"), cu(lengths_k, "cuda"), lengths_q, lengths_k)
    out = varlen_attention(q, k, v, *args, scale=0.1, backend="torch")
    ref = varlen_attention(q, k, v, *args, scale=0.1, backend="sdpa")
    assert calls == [(8, 2)]
    exact = explicit_attention(q.float(), k.float(), v.float(), lengths_q, lengths_k, 0.1)
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-2
    weights = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref.float() * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="fp16/bf16 inputs only"):
        varlen_attention(q.float(), k.float(), v.float(), *args, backend="torch")


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
