"""Predicted peak GPU memory of one `sdpo-fast train` step, from a model config alone (no weights loaded).

Parameter counts are exact (the model is built on the meta device). Activations assume a flash/varlen attention
(no seq x seq buffer): with gradient checkpointing, each layer's input is kept ((layers + 1) * d values per token,
plus the rotary cos/sin) and one layer is recomputed at a time; without, every layer keeps its intermediates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES = {
    # From the published config (shared/ANCHORS.md): 8.19B parameters, untied embeddings.
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False),
}
_OPTIMIZER_BYTES_PER_PARAM = {"adamw": None, "adamw8bit": 2, "sgd": 0}  # None: two states in the param dtype
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of one training step's peak, and the parameter counts behind them."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    prefix_kv: int
    loss_workspace: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.prefix_kv
                + self.loss_workspace)

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("prefix K/V", self.prefix_kv),
                ("loss workspace", self.loss_workspace), ("total", self.total)]


def load_config(model: str):
    """A transformers config: a name in SHAPES, a local directory / config.json, or a Hub id."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if model.lower() in SHAPES:
        fields = dict(SHAPES[model.lower()])
        return CONFIG_MAPPING[fields.pop("model_type")](**fields)
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no model config at {model!r} (known shapes: {sorted(SHAPES)}): "
                         f"{str(exc).splitlines()[0]}") from None


def meta_model(config):
    """The causal LM of `config` on the meta device (shapes only)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_parameters(model, r: int, target_modules: list[str]) -> int:
    """Adapter parameters r * (in + out) over the targeted nn.Linear modules ("all-linear": all but the lm_head)."""
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if target_modules == ["all-linear"] or name.rsplit(".", 1)[-1] in target_modules:
            total += r * (module.in_features + module.out_features)
    return total


def plan_memory(config, *, dtype: torch.dtype = torch.bfloat16, lora_r: int = 0,
                lora_target_modules: list[str] | None = None, optimizer: str = "adamw",
                prompt_tokens: int = 2048, completion_tokens: int = 2048, micro_batch_tokens: int | None = None,
                gradient_checkpointing: bool = True, loss_chunk_bytes: int = 32 << 20) -> MemoryPlan:
    """Peak-memory parts for a micro-batch of one interaction (or `micro_batch_tokens` packed student tokens).

    LoRA adapters are fp32 (peft's default), so are their gradients and AdamW states; full fine-tuning keeps
    gradients and AdamW states in `dtype`.
    """
    if optimizer not in _OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZER_BYTES_PER_PARAM)}, got {optimizer!r}")
    model = meta_model(config)
    width = torch.finfo(dtype).bits // 8
    parameters = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    inter = text.intermediate_size

    if lora_r:
        trainable = lora_parameters(model, lora_r, lora_target_modules or ["all-linear"])
        weights = parameters * width + trainable * 4
        gradients, state_width = trainable * 4, 4
    else:
        trainable, weights, gradients, state_width = parameters, parameters * width, parameters * width, width
    per_param = _OPTIMIZER_BYTES_PER_PARAM[optimizer]
    optimizer_bytes = trainable * (2 * state_width if per_param is None else per_param)

    tokens = micro_batch_tokens or prompt_tokens + completion_tokens
    completion = min(completion_tokens, tokens)
    layer_elements = 4 * d + 2 * (heads + 2 * kv_heads) * head_dim + 4 * inter
    if gradient_checkpointing:
        activations = tokens * ((layers + 1) * d + 2 * head_dim + layer_elements) * width
    else:
        activations = tokens * layers * layer_elements * width
    prefix_kv = max(tokens - completion, 0) * layers * 2 * kv_heads * head_dim * width
    logits_rows = max(1, loss_chunk_bytes // (4 * vocab))
    head_trainable = not lora_r
    loss_workspace = (2 * completion * d * width + 2 * min(logits_rows, completion) * vocab * 4
                      + (vocab * d * 4 if head_trainable else 0))
    return MemoryPlan(parameters, trainable, weights, gradients, optimizer_bytes, activations, prefix_kv,
                      loss_workspace)


def format_plan(plan: MemoryPlan, budget_gib: float | None = None) -> str:
    lines = [f"parameters {plan.parameters / 1e9:.3f}B, trainable {plan.trainable / 1e6:.2f}M"]
    lines += [f"  {name:<17}{value / GIB:9.2f} GiB" for name, value in plan.rows()]
    if budget_gib is not None:
        fits = plan.total <= budget_gib * GIB
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {budget_gib:g} GiB"
                     + ("" if fits else ": lower --micro-batch-tokens, use --lora-r, or enable checkpointing"))
    return "\n".join(lines)
