"""What the packed passes and `sdpo_loss` reproduce of a causal LM, decided from its config alone (before any weight
loads), and the logit head of a loaded one.

The causal LM's class (from the config, through transformers' auto mapping) must use transformers'
AttentionInterface, feed the decoder's last hidden states straight to its lm_head, and transform the logits only in
ways `sdpo_loss` takes as arguments: a scale (Cohere's `logit_scale`; Granite's `logits_scaling`, which divides) and
a soft cap (Gemma-2/3's `final_logit_softcapping`). These are read from the source of the class's forward: a
statement there that is not one of them is refused, naming it. Attention layers with a sliding window or soft-capped
scores need an attention backend that serves them (`attention_refusal`).
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path

import torch

from ..loss.head import LogitHead
from .attention import ATTN_IMPLEMENTATION, flash_available, torch_varlen_available, window_backends
from .hf import unwrap_model

_HEAD_CALL = re.compile(r"(\w+) = self\.lm_head\(([^\n]*)\)\n")
_HEAD_INPUTS = re.compile(r"hidden_states(\[:, slice_indices, :\])?(\.to\([\w.=]*\))?")
_BEFORE_HEAD = [re.compile(p) for p in (
    r"hidden_states = outputs(\.last_hidden_state|\[0\])",
    r"slice_indices = .*",
    r"hidden_states = slice_logits_to_keep\((hidden_states|outputs\.last_hidden_state|outputs\[0\]), logits_to_keep\)",
)]
_SCALE = re.compile(r"logits = logits \* self\.(config\.)?(text_config\.)?logit_scale")
_DIVIDE = re.compile(r"logits = logits / self\.config\.logits_scaling")
_CAP = [re.compile(p) for p in (
    r"if (self\.config\.final_logit_softcapping|\(final_logit_softcapping := .*\)) is not None:",
    r"logits = logits(\.float\(\))? / (self\.config\.)?final_logit_softcapping",
    r"logits = torch\.tanh\(logits\)",
    r"logits = logits \* (self\.config\.)?final_logit_softcapping",
    r"logits = logits\.to\(torch\.float32\)",
)]
_SCALE_GUARD = re.compile(r"if self\.logit_scale is not None:")
_END = re.compile(r"(loss\b|if labels|return\b|if not return_dict)")
SERVED_ATTENTION_KEYWORDS = frozenset({"dropout", "scaling", "sliding_window", "softcap", "position_ids",
                                       "attention_mask", "output_attentions"})
"""Keywords of a model's attention_interface calls that `sdpo_varlen_attention` serves (or that do not change what
it computes)."""


def causal_lm_class(config):
    """The transformers causal LM class a config builds (ValueError when there is none)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"model_type {config.model_type!r} has no causal LM class in transformers "
                         "(AutoModelForCausalLM); pass a decoder-only language model") from None


def _statements(source: str) -> list[str]:
    return [line.split("#")[0].strip() for line in source.splitlines() if line.split("#")[0].strip()]


@functools.cache
def head_transform_names(cls) -> tuple[str, ...]:
    """The logit transforms of `cls.forward` after its lm_head, as config attribute names ("logit_scale",
    "logits_scaling", "final_logit_softcapping"). ValueError naming the first statement not understood."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        raise ValueError(f"{cls.__name__}: the source of its forward is unavailable, so sdpo_fast cannot tell how "
                         "it forms its logits") from None
    call = _HEAD_CALL.search(source)
    if call is None or call.group(1) != "logits" or not _HEAD_INPUTS.fullmatch(call.group(2).strip()):
        raise ValueError(f"{cls.__name__} does not form its logits as `logits = self.lm_head(hidden_states)`; "
                         "sdpo_fast computes them from the decoder's last hidden states and the lm_head")
    before = _statements(source[:call.start()])
    decoder_call = max((i for i, s in enumerate(before) if s.startswith("outputs") and "self." in s), default=None)
    if decoder_call is not None:
        depth = 0
        for i, statement in enumerate(before[decoder_call:], decoder_call):
            depth += statement.count("(") - statement.count(")")
            if depth <= 0:
                break
        for statement in before[i + 1:]:
            if not any(p.fullmatch(statement) for p in _BEFORE_HEAD):
                raise ValueError(f"{cls.__name__} changes the hidden states between its decoder and lm_head "
                                 f"(`{statement}`); sdpo_fast does not reproduce that")
    names = []
    for statement in _statements(source[call.end():]):
        if _END.match(statement):
            break
        if _SCALE.fullmatch(statement):
            names.append("logit_scale")
        elif _DIVIDE.fullmatch(statement):
            names.append("logits_scaling")
        elif any(p.fullmatch(statement) for p in _CAP):
            names.append("final_logit_softcapping")
        elif not _SCALE_GUARD.fullmatch(statement):
            raise ValueError(f"{cls.__name__} transforms its logits after the lm_head in a way sdpo_fast does not "
                             f"reproduce (`{statement}`)")
    return tuple(dict.fromkeys(names))


@functools.cache
def attention_keywords(cls) -> frozenset[str]:
    """The keyword arguments the modeling module of `cls` passes to its attention_interface calls."""
    source = inspect.getsource(sys.modules[cls.__module__])
    names = set()
    for call in re.finditer(r"attention_interface\(", source):
        depth, end = 1, call.end()
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        names |= set(re.findall(r"(?<![\w.])(\w+)\s*=(?!=)", source[call.end():end - 1]))
    return frozenset(names)


def _positive(config, name: str):
    value = getattr(config, name, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                              or value == float("inf")):
        raise ValueError(f"config.{name}={value!r}: sdpo_fast needs None or a finite number > 0")
    return value


def logit_transform(config, cls=None) -> tuple[float, float | None]:
    """(scale, softcap) of the logits the causal LM of `config` (class `cls`, default the one transformers maps the
    config to) computes after its lm_head (see the module docstring); ValueError naming what it cannot reproduce."""
    names = head_transform_names(cls or causal_lm_class(config))
    text = config.get_text_config()
    scale, softcap = 1.0, None
    if "logit_scale" in names and _positive(text, "logit_scale") is not None:
        scale = float(text.logit_scale)
    if "logits_scaling" in names and _positive(text, "logits_scaling") is not None:
        scale = 1.0 / float(text.logits_scaling)
    if "final_logit_softcapping" in names and _positive(text, "final_logit_softcapping") is not None:
        softcap = float(text.final_logit_softcapping)
    return scale, softcap


def _uses_windows(text) -> bool:
    if getattr(text, "sliding_window", None) is None:
        return False
    layer_types = getattr(text, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def attention_refusal(config, attn_backend: str = "auto", device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> str | None:
    """Why the packed passes cannot run the attention layers of `config` on `attn_backend` (as "auto" resolves on
    `device` with `dtype`), or None when they can."""
    text = config.get_text_config()
    device = torch.device(device)
    backend = attn_backend
    if backend == "auto":  # as attention.resolve_backend picks it for these inputs
        half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        backend = "flash" if half and flash_available() else "torch" if half and torch_varlen_available() else "sdpa"
    for name in ("attention_chunk_size",):
        if getattr(text, name, None) is not None:
            return f"config.{name}={getattr(text, name)!r}: the packed passes do not serve chunked attention"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        if backend == "torch" or (backend == "sdpa" and device.type == "cuda"):
            return (f"config.attn_logit_softcapping={text.attn_logit_softcapping!r}: soft-capped attention is served "
                    f"by flash-attn (attn_backend 'flash'), or on the CPU, not by attn_backend {backend!r}")
    if _uses_windows(text) and backend not in window_backends():
        return (f"config.sliding_window={text.sliding_window!r}: sliding-window attention is served by "
                f"{', '.join(repr(b) for b in window_backends())}, not by attn_backend {backend!r} here")
    return None


def check_model_support(config, *, attn_backend: str = "auto", device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, cls=None) -> None:
    """ValueError (one line, naming the attribute or backend) when sdpo_fast cannot compute exactly what the causal
    LM of `config` (class `cls`, default transformers' for the config) computes: run it before the weights load."""
    cls = cls or causal_lm_class(config)
    if not getattr(cls, "_supports_attention_backend", False):
        raise ValueError(f"{cls.__name__} does not use transformers' AttentionInterface, which the packed passes "
                         f"({ATTN_IMPLEMENTATION}) plug into")
    logit_transform(config, cls)
    unserved = sorted(attention_keywords(cls) - SERVED_ATTENTION_KEYWORDS)
    if unserved:
        raise ValueError(f"{cls.__name__} passes {', '.join(unserved)} to its attention, which the packed passes "
                         f"({ATTN_IMPLEMENTATION}) do not serve")
    refusal = attention_refusal(config, attn_backend, device, dtype)
    if refusal is not None:
        raise ValueError(f"{cls.__name__}: {refusal}")


def check_model_name(name: str, *, attn_backend: str = "auto", device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> None:
    """`check_model_support` on the config of a local model directory or Hub id (config.json only; an adapter
    directory's base model; a remote-code model's own class with trust_remote_code)."""
    from transformers import AutoConfig

    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read the config of model {name!r}: {str(exc).splitlines()[0]}") from None
    cls = None
    remote = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if trust_remote_code and remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(remote, name)
    check_model_support(config, attn_backend=attn_backend, device=device, dtype=dtype, cls=cls)


def logit_head(model) -> LogitHead:
    """The logit head of a loaded causal LM (or peft model): its lm_head weight and bias, and the scale and soft cap
    its config applies after it. TypeError when the lm_head is not a linear map, ValueError when it carries an
    adapter (its output is not weight @ h + bias: leave lm_head out of the LoRA targets)."""
    hf_model = unwrap_model(model)
    head = hf_model.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise ValueError(f"{type(hf_model).__name__}'s lm_head carries an adapter ({type(head).__name__}); sdpo_fast "
                         "computes logits from the lm_head weight: leave lm_head (and tied embeddings with "
                         "ensure_weight_tying) out of the LoRA targets")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(hf_model).__name__}'s lm_head ({type(head).__name__}) has no (V, d) weight")
    scale, softcap = logit_transform(hf_model.config, type(hf_model))
    return LogitHead(weight, getattr(head, "bias", None), scale, softcap)
