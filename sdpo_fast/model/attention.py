"""The `sdpo_varlen` attention implementation: packed (varlen) causal attention plugged into transformers.

A model switched to `sdpo_varlen` (see `sdpo_attention`) attends as usual ("sdpa") unless a forward
receives a `VarlenCall` as the `sdpo_call` keyword argument; transformers hands that argument to every
attention layer, and gradient-checkpointed layers keep it for their recomputation. With a call, the
single packed row [1, T] holds several sequences delimited by `cu_seqlens_q`:

- mode "plain": causal attention within each sequence;
- mode "student": the same, and each layer's shared-prefix K/V are kept in `prefix_cache` (once);
- mode "teacher": the row holds suffixes only; sequence i attends to [stored prefix i; suffix i],
  causal, aligned bottom-right.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..utils.device import upload
from .prefix_cache import PrefixKVCache

ATTN_IMPLEMENTATION = "sdpo_varlen"
BACKENDS = ("auto", "flash", "torch", "sdpa")
MODES = ("plain", "student", "teacher")
_HALF = (torch.float16, torch.bfloat16)
UNSERVED_KEYWORDS = ("s_aux", "indices", "block_indices", "cu_seq_lens_q", "cu_seq_lens_k")
"""Attention arguments some models pass (sinks, sparse indices, their own packing) that `sdpo_varlen` does not
serve: a call with one of them set is an error, not a silently different attention."""

_packed_forward: contextvars.ContextVar[bool] = contextvars.ContextVar("sdpo_packed_forward", default=False)


@dataclass
class VarlenCall:
    """State of one packed forward, read by every attention layer.

    cu_seqlens_q: (n + 1,) int32 on the model's device, query offsets in the packed row; lengths_q the
    same as Python ints. Teacher calls also carry the key layout ([prefix; suffix] per sequence) and the
    index that assembles it from cat([stored prefix K/V, suffix K/V]). attention_calls counts the layer
    calls that received it (a model that drops the keyword would leave it at 0).
    """

    mode: str
    backend: str
    cu_seqlens_q: torch.Tensor
    lengths_q: tuple[int, ...]
    prefix_cache: PrefixKVCache | None = None
    cu_seqlens_k: torch.Tensor | None = None
    lengths_k: tuple[int, ...] | None = None
    join_index: torch.Tensor | None = None
    attention_calls: int = 0


def _cu_seqlens(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return upload(offsets, torch.int32, device)


def make_call(mode: str, lengths: Sequence[int], device: torch.device, *, backend: str = "auto",
              prefix_cache: PrefixKVCache | None = None) -> VarlenCall:
    """Build the `sdpo_call` for a packed row of sequences with `lengths` query tokens each.

    "student" and "teacher" need `prefix_cache`; for "teacher", `lengths` are the suffix lengths.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_backend(backend)
    lengths = tuple(int(n) for n in lengths)
    if not lengths or min(lengths) < 0:
        raise ValueError(f"lengths must be a non-empty sequence of non-negative ints, got {lengths}")
    if mode != "plain" and prefix_cache is None:
        raise ValueError(f"mode {mode!r} needs a prefix_cache")
    if prefix_cache is not None and prefix_cache.num_sequences != len(lengths):
        raise ValueError(f"prefix_cache holds {prefix_cache.num_sequences} sequences, lengths has {len(lengths)}")
    cu_q = _cu_seqlens(lengths, device)
    if mode != "teacher":
        if mode == "student" and prefix_cache.sequence_lengths != lengths:
            raise ValueError("student lengths must equal the prefix_cache's sequence_lengths")
        return VarlenCall(mode, backend, cu_q, lengths, prefix_cache)
    lengths_k = tuple(p + s for p, s in zip(prefix_cache.prefix_lengths, lengths))
    return VarlenCall(mode, backend, cu_q, lengths, prefix_cache, _cu_seqlens(lengths_k, device), lengths_k,
                      prefix_cache.join_index(lengths, device))


@functools.cache
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def varlen_refusal(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the flash and torch varlen kernels cannot run on `device` with `dtype` inputs (None: they can, or the
    dtype is not known yet). Both are FlashAttention-2 kernels: fp16/bf16 only, on CUDA GPUs of compute
    capability >= 8.0."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"they run on CUDA GPUs only, not {device.type}"
    if dtype is not None and dtype not in _HALF:
        return f"they take fp16/bf16 inputs only, not {str(dtype).removeprefix('torch.')}"
    major, minor = _capability(device)
    if major < 8:
        return f"they need a GPU of compute capability >= 8.0, {device} has {major}.{minor}"
    return None


def check_backend(backend: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise ValueError if `backend` is unknown or its library is missing; given the device (and the dtype the
    attention runs in, e.g. the configured compute dtype), also if an explicit flash/torch backend cannot run
    there. One line, naming the backend that can."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash" and _flash_varlen() is None:
        raise ValueError("attn_backend='flash' needs the flash-attn package")
    if backend == "torch" and _torch_varlen() is None:
        raise ValueError("attn_backend='torch' needs torch.nn.attention.varlen (torch >= 2.10)")
    if backend in ("flash", "torch") and device is not None:
        why = varlen_refusal(device, dtype)
        if why is not None:
            raise ValueError(f"attn_backend={backend!r} cannot run here: {why}; use attn_backend='sdpa' "
                             "(or 'auto', which picks it)")


def resolve_backend(backend: str, query: torch.Tensor, dropout: float) -> str:
    """The backend that runs: "auto" picks flash, then torch varlen (fp16/bf16 on CUDA with compute capability
    >= 8.0), else sdpa."""
    if backend != "auto":
        return backend
    if varlen_refusal(query.device, query.dtype) is None:
        if _flash_varlen() is not None:
            return "flash"
        if _torch_varlen() is not None and dropout == 0.0:
            return "torch"
    return "sdpa"


@functools.cache
def _fast_sdpa_backends() -> tuple:
    """SDPA kernels other than the math one (which forms every H x n_q x n_k score): flash, efficient, cuDNN."""
    from torch.nn.attention import SDPBackend

    return tuple(getattr(SDPBackend, name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
                 if hasattr(SDPBackend, name))


_NO_FAST_SDPA = ("no fused SDPA kernel takes these inputs ({why}); the math kernel would hold H x n_q x n_k scores "
                 "per layer. Install flash-attn (attn_backend 'flash') or use torch >= 2.10 (attn_backend 'torch')")


def _window_mask(n_q: int, n_k: int, window: int | None, device) -> torch.Tensor:
    """(n_q, n_k) bool: causal, aligned bottom-right, and with a window only the last `window` keys up to each query
    (key position > query position - window, as transformers' sliding-window mask)."""
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
    if window is not None:
        allowed &= ~torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q - window)
    return allowed


def _capped_attention(q, k, v, mask, scale, softcap, dropout):
    """Attention of q (1, H, n_q, D) over k/v (1, Hkv, n_k, D) with scores c * tanh(s / c) (Gemma-2's), in the
    inputs' dtype as transformers' eager attention computes them."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # a fully masked (padding) row stays finite
    return F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout) @ v


def _sdpa_varlen(q, k, v, lengths_q, lengths_k, scale, dropout, window=None, softcap=None):
    """Per-sequence SDPA. On CUDA the math kernel is never used: K/V heads are repeated per sequence for GQA
    (fused kernels with masks do not all take `enable_gqa`) and a missing fused kernel is an error. A sliding
    window is a mask; soft-capped scores are computed explicitly, on the CPU only."""
    on_cuda = q.is_cuda
    if softcap is not None and on_cuda:
        raise ValueError("soft-capped attention on CUDA needs flash-attn (attn_backend 'flash')")
    groups = q.shape[1] // k.shape[1]
    outs, start_q, start_k = [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k):
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[start_q:start_q + n_q], k[start_k:start_k + n_k],
                                                                  v[start_k:start_k + n_k]))
        start_q, start_k = start_q + n_q, start_k + n_k
        if n_q == 0:
            continue
        if softcap is not None:
            outs.append(_capped_attention(qi, ki, vi, _window_mask(n_q, n_k, window, q.device), scale, softcap,
                                          dropout)[0].transpose(0, 1))
            continue
        windowed = window is not None and window < n_k
        skip = n_k - n_q if 2 * n_q > n_k and not windowed else 0
        if skip:  # cheaper as the causal square (blocks above the diagonal skipped) minus its first `skip` rows
            qi = F.pad(qi, (0, 0, skip, 0))
        mask = None if n_q + skip == n_k and not windowed else _window_mask(n_q, n_k, window, q.device)
        gqa = groups > 1 and not on_cuda
        if on_cuda and groups > 1:
            ki, vi = ki.repeat_interleave(groups, dim=1), vi.repeat_interleave(groups, dim=1)
        with _sdpa_kernels(on_cuda):
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=mask is None, scale=scale, enable_gqa=gqa)
        outs.append(out[0, :, skip:].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else torch.empty_like(q)


@contextlib.contextmanager
def _sdpa_kernels(on_cuda: bool) -> Iterator[None]:
    if not on_cuda:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel(list(_fast_sdpa_backends())):
            yield
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
        raise ValueError(_NO_FAST_SDPA.format(why=str(exc).splitlines()[0])) from None


def _torch_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, window=None):
    """torch.nn.attention.varlen.varlen_attn, one call for every head, GQA included: in torch 2.10 and 2.11 it runs
    aten's FlashAttention-2 varlen kernel, which takes fewer K/V heads than query heads (mha_varlen_fwd/_bwd check
    num_heads % num_heads_k == 0 and sum dK/dV over each group). Feature-detected: causal as window_size=(-1, 0)
    (2.11) or is_causal=True (2.10); `scale` (absent in 2.10) folded into q when missing; a sliding window by
    `window_size` (ValueError where the version has none)."""
    params = _torch_varlen_params()
    if window is not None and "window_size" not in params:
        raise ValueError("sliding-window attention: this torch's varlen_attn has no window_size; use attn_backend "
                         "'flash' or 'sdpa'")
    left = -1 if window is None else window - 1
    kwargs = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    default_scale = q.shape[-1] ** -0.5
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and scale != default_scale:
        q = q * (scale / default_scale)
    return _torch_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, lengths_q: Sequence[int], lengths_k: Sequence[int], *,
                     scale: float | None = None, dropout: float = 0.0, backend: str = "auto",
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention per packed sequence, aligned bottom-right when a sequence has more keys than queries.

    q (Tq, H, D), k/v (Tk, Hkv, D) with H % Hkv == 0; cu_seqlens_* (n + 1,) int32 on q's device and
    lengths_* the per-sequence lengths as ints. window: each query attends to its last `window` keys only (itself
    included; transformers' `sliding_window`); softcap: scores c * tanh(s / c). Returns (Tq, H, D) in q's dtype
    (under `torch.autocast`, in its dtype: q, k and v are cast to it first, as autocast casts SDPA's inputs).
    """
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"varlen_attention needs q, k and v in one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    backend = resolve_backend(backend, q, dropout)
    check_backend(backend, q.device, q.dtype)
    if backend == "sdpa":
        return _sdpa_varlen(q, k, v, lengths_q, lengths_k, scale, dropout, window, softcap)
    max_q, max_k = max(lengths_q), max(lengths_k)
    if backend == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p=dropout,
                               softmax_scale=scale, causal=True,
                               **({} if window is None else {"window_size": (window - 1, 0)}),
                               **({} if softcap is None else {"softcap": softcap}))
    if dropout != 0.0:
        raise ValueError("attn_backend='torch' does not support attention dropout")
    if softcap is not None:
        raise ValueError("soft-capped attention is not served by attn_backend 'torch'; use 'flash'")
    return _torch_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, window)


def flash_available() -> bool:
    return _flash_varlen() is not None


def torch_varlen_available() -> bool:
    return _torch_varlen() is not None


def window_backends() -> tuple[str, ...]:
    """The attention backends that serve sliding windows here: sdpa, flash, and torch varlen where it has
    `window_size`."""
    served = ("sdpa", "flash")
    return served + ("torch",) if _torch_varlen() is not None and "window_size" in _torch_varlen_params() else served


def sdpo_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, sdpo_call: VarlenCall | None = None, **kwargs):
    """transformers attention function: query (1, H, T, D), key/value (1, Hkv, T, D) after RoPE.

    Returns (attn_output (1, T, H, D), None). Without `sdpo_call` it is transformers' sdpa attention, or for
    soft-capped scores (which SDPA cannot apply) their explicit computation under the same mask.
    """
    if sdpo_call is None and kwargs.get("softcap") is not None:
        n_q, n_k = query.shape[2], key.shape[2]
        mask = _window_mask(n_q, n_k, sliding_window, query.device) if attention_mask is None else attention_mask
        if mask.dtype != torch.bool:
            mask = mask == 0
        out = _capped_attention(query, key, value, mask, scaling, kwargs["softcap"], dropout)
        return out.transpose(1, 2).contiguous(), None
    if sdpo_call is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    unserved = [name for name in UNSERVED_KEYWORDS if kwargs.get(name) is not None]
    if unserved:
        raise ValueError(f"sdpo_varlen does not serve the attention argument(s) {unserved} of {type(module).__name__}")
    if query.shape[0] != 1 or query.shape[2] != sum(sdpo_call.lengths_q):
        raise ValueError(f"a packed call expects query (1, H, {sum(sdpo_call.lengths_q)}, D), "
                         f"got {tuple(query.shape)}")
    sdpo_call.attention_calls += 1
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu_k, lengths_k = sdpo_call.cu_seqlens_q, sdpo_call.lengths_q
    if sdpo_call.mode == "student":
        sdpo_call.prefix_cache.store(module, k, v)
    elif sdpo_call.mode == "teacher":
        k, v = sdpo_call.prefix_cache.join(module, k, v, sdpo_call.join_index)
        cu_k, lengths_k = sdpo_call.cu_seqlens_k, sdpo_call.lengths_k
    out = varlen_attention(q, k, v, sdpo_call.cu_seqlens_q, cu_k, sdpo_call.lengths_q, lengths_k, scale=scaling,
                           dropout=dropout, backend=sdpo_call.backend, window=sliding_window,
                           softcap=kwargs.get("softcap"))
    return out.unsqueeze(0), None


def _sdpo_mask(*args, **kwargs):
    if _packed_forward.get():
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register `sdpo_varlen` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpo_varlen_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _sdpo_mask)


@contextlib.contextmanager
def packed_forward() -> Iterator[None]:
    """Within it, models on `sdpo_varlen` build no attention mask (the packed call defines the layout)."""
    token = _packed_forward.set(True)
    try:
        yield
    finally:
        _packed_forward.reset(token)


def enable_sdpo_attention(model: PreTrainedModel) -> str:
    """Switch `model` to `sdpo_varlen` and return the implementation it had before."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise TypeError(f"{type(model).__name__} cannot switch its attention implementation: it does not use "
                            "transformers' AttentionInterface")
    return previous


@contextlib.contextmanager
def sdpo_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the block with `model` on `sdpo_varlen`, then restore its previous attention implementation."""
    previous = enable_sdpo_attention(model)
    try:
        yield
    finally:
        if previous != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous)
