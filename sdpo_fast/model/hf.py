"""Hugging Face helpers: the causal LM inside a wrapper, activation checkpointing, Liger patches, eval mode for a
block."""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel


def unwrap_model(model) -> PreTrainedModel:
    """The transformers causal LM inside `model` (itself, or a peft model's base model)."""
    base = model
    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        base = model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel or a peft model, got {type(model).__name__}")
    if base.get_output_embeddings() is None:
        raise TypeError(f"model {type(base).__name__} has no output embeddings (lm_head); pass a causal LM")
    return base


def checkpoint_layers_of(model) -> list[torch.nn.Module]:
    """The decoder layers of `model` that transformers can checkpoint (its GradientCheckpointingLayer modules), in
    order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: PreTrainedModel, layers: int | None = None, offload=None) -> None:
    """Checkpoint the first `layers` decoder layers of `model` (None: every one; non-reentrant), with the name
    the installed transformers offers; the others keep their activations for backward. offload: an
    `OffloadedInputs` that holds the checkpointed layers' inputs until backward (model/offload.py).

    transformers >= 5.25 calls it `activation_checkpointing_enable` and warns on `gradient_checkpointing_enable`,
    its deprecated alias (to be removed in v6); older releases have only the latter. Its `every_n_layers` picks
    every n-th layer and its `offload` copies on the compute stream, so the first-N choice and the offload are
    set here on the layers it flagged.
    """
    if layers == 0:
        return
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(checkpoint_layers_of(model)):
        if layers is not None and i >= layers:
            layer.gradient_checkpointing = False
        elif offload is not None:
            layer._gradient_checkpointing_func = offload.wrap(layer._gradient_checkpointing_func)


def apply_liger_kernels(model) -> bool:
    """Patch `model` in place with Liger-Kernel's RMSNorm/SwiGLU/RoPE kernels where they apply (never its loss).

    Returns False, changing nothing, when liger-kernel is not installed or the model is not on CUDA.
    """
    hf_model = unwrap_model(model)
    if importlib.util.find_spec("liger_kernel") is None or hf_model.device.type != "cuda":
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=hf_model, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for `module` and its submodules inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
