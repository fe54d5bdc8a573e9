"""Setup factories shared by train, online and explain: device and dtype, tokenizer and model (safetensors only),
LoRA adapters, optimizer and schedule. Each fails with one ValueError naming the option and the fix."""
from __future__ import annotations

import importlib
import math
import os
import re
from pathlib import Path

import torch

from ..demo.assets import tiny_model_path
from ..loss.validation import check_topk_vocabulary
from ..model import (OffloadedInputs, apply_liger_kernels, check_model_name, checkpoint_layers_of,
                     enable_checkpointing, unwrap_model)
from ..utils.hub import hub_endpoint, hub_unreachable
from .precision import fp32_draws_kept, needs_master_weights, to_compute_dtype, to_fp32, with_master_weights

NO_PEFT = "lora_r > 0 needs peft (pip install 'sdpo_fast[lora]'); or set lora_r 0 for full fine-tuning"
FP16_REFUSED = ("dtype float16 has no loss scaling here (small gradients underflow to zero); use --dtype bfloat16 "
                "(same memory, fp32 range)")
NO_BNB = "optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes; CUDA); use --optimizer adamw instead"


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # the process's own GPU under torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 elsewhere; else the named torch dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(name: str, *, weights: bool = True, argument: str = "--model") -> None:
    """FileNotFoundError/ValueError naming `argument` before anything loads: a local directory must hold a
    config.json, tokenizer files and (with `weights`) safetensors weights; a name that is no local directory
    must look like a Hub id (`org/name`, no ./, ../, /, ~, backslash or more than one /), and with
    HF_HUB_OFFLINE set it must already be in the Hugging Face cache. A path-like name that does not exist is
    "no such local directory" at once, never a Hub lookup."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ValueError(f"{argument} {name!r} has no config.json; pass a Hugging Face model directory")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"{argument} {name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy "
                             "the tokenizer into it (tokenizer.save_pretrained)")
        if weights and not any(path.glob("*.safetensors")):
            other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f"only {', '.join(other[:3])}: pickle weights are not loaded" if other else "no weights"
            raise ValueError(f"{argument} {name!r} has {found}; save it with safetensors "
                             "(model.save_pretrained(dir, safe_serialization=True))")
        return
    if path.exists():
        raise ValueError(f"{argument} {name!r} is a file; pass a model directory or a Hub id")
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise FileNotFoundError(f"{argument} {name!r}: no such local directory (and not a Hub id)")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(f"{argument} {name!r}: no such local directory, and HF_HUB_OFFLINE is set "
                                    "with no cached copy; pass a local model directory")
        return
    if hub_unreachable() is not None:
        raise FileNotFoundError(f"{argument} {name!r}: no such local directory, and the Hub ({hub_endpoint()[0]}) "
                                "cannot be reached to download it; pass a local model directory")


def check_model_options(config, name: str) -> None:
    """The options that depend on the model, checked from its config before any weights load or anything is
    written: distillation_topk at most the vocabulary, checkpoint_layers at most the decoder layers (ValueError
    naming it)."""
    topk = config.loss == "sdpo" and config.distillation_mode == "topk_logits"
    if not topk and config.checkpoint_layers is None and not config.offload_activations:
        return
    from transformers import AutoConfig

    from .config import resolved_checkpoint_layers

    text_config = AutoConfig.from_pretrained(name, trust_remote_code=config.trust_remote_code).get_text_config()
    if topk:
        check_topk_vocabulary(config.distillation_mode, config.distillation_topk, text_config.vocab_size)
    resolved_checkpoint_layers(config, text_config.num_hidden_layers, resolve_device(config.device).type)


def _not_local(name: str) -> str:
    return "" if Path(name).expanduser().exists() else " (no such local directory; tried the Hub)"


def load_tokenizer(name: str, *, trust_remote_code: bool = False, check_source: bool = True):
    """The tokenizer of a local dir or Hub id; check_source False: the caller has run `check_model_source`."""
    from transformers import AutoTokenizer

    if check_source:
        check_model_source(name, weights=False)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load the tokenizer of {name!r}{_not_local(name)}: "
                         f"{str(exc).splitlines()[0]}") from None


def load_model(name: str, *, dtype: torch.dtype | str, device: torch.device, trust_remote_code: bool = False,
               load_in_4bit: bool = False, check_source: bool = True):
    """A causal LM from a local dir or Hub id on `device` (safetensors only). dtype "auto": the checkpoint's.
    load_in_4bit: NF4 base weights (bitsandbytes), placed on `device` by transformers. check_source False: the
    caller has run `check_model_source` and `check_model_name` (train's preflight)."""
    from transformers import AutoModelForCausalLM

    if check_source:
        check_model_source(name)
        check_model_name(name, device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None,
                         trust_remote_code=trust_remote_code)
    quantization = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
        quantization["device_map"] = {"": device.index}
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **quantization)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"could not load model {name!r}{_not_local(name)}: {str(exc).splitlines()[0]}") from None
    if load_in_4bit:
        return model
    if isinstance(dtype, torch.dtype):  # parameters only: RoPE's fp32 frequencies rounded to bf16 shift angles
        model = model.to(device)        # by position * 2^-9 rad
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        return model
    return model.to(device)


def lora_config(r: int, alpha: float, dropout: float, target_modules: str | list[str]):
    """A peft LoraConfig for a causal LM; target_modules "all-linear" (or ["all-linear"]) or module names."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError(NO_PEFT) from None
    if target_modules == ["all-linear"]:
        target_modules = "all-linear"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                      task_type="CAUSAL_LM")


def apply_lora(model, config, adapter_name: str = "default", *, fp32_adapters: bool = True):
    """`model` wrapped with fresh LoRA adapters of peft `config` (initialized from the global RNG).
    fp32_adapters False: adapters in the base weights' dtype, so a bf16 base's inputs are not copied to fp32.
    Either way each adapter starts from peft's fp32 draw, not its rounding to a 16-bit base's dtype: fp32 adapters
    hold it, 16-bit ones keep it as their master weight's start (train/precision.py)."""
    from peft import get_peft_model

    try:
        with fp32_draws_kept():
            model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise ValueError(f"lora_target_modules {config.target_modules}: {exc}") from None
    if fp32_adapters:  # peft's autocast_adapter_dtype would upcast the rounding
        to_fp32(p for p in model.parameters() if p.requires_grad)
    return model


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, *,
                    construct=None) -> torch.optim.Optimizer:
    """"adamw" (fused on CUDA), "adamw8bit" (bitsandbytes) or "sgd" over `params`; 16-bit parameters are
    stepped through fp32 master copies (train/precision.py). construct: `group -> optimizer` in place of the
    named one (the memory planner's stand-ins)."""
    if not params:
        raise ValueError("the model has no trainable parameters")
    if any(p.dtype == torch.float16 for p in params):
        raise ValueError(FP16_REFUSED)

    def named(group: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(group, lr=lr, weight_decay=weight_decay)
        if name == "adamw8bit":
            try:
                import bitsandbytes
            except ImportError:
                raise ValueError(NO_BNB) from None
            return bitsandbytes.optim.AdamW8bit(group, lr=lr, weight_decay=weight_decay)
        fused = all(p.device.type == "cuda" and not hasattr(p, "placements") for p in group)  # DTensors: foreach
        return torch.optim.AdamW(group, lr=lr, weight_decay=weight_decay, fused=fused or None)

    build = construct or named
    return with_master_weights(params, build) if needs_master_weights(params) else build(params)


def build_scheduler(optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """"cosine" or "constant", after a linear warm-up over ceil(warmup_ratio * total_steps) steps."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(warmup_ratio * total_steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def load_model_and_tokenizer(config, checkpoint: Path | None = None, *, device: torch.device | None = None,
                             dtype: torch.dtype | None = None, tokenizer=None, training: bool = True):
    """The model a `TrainConfig` trains (LoRA-wrapped if lora_r > 0, weights from `checkpoint` when resuming)
    and its tokenizer. model None: the bundled tiny Qwen3. device / dtype: where and in what the weights load
    (default: config.device's device and config.dtype). tokenizer: the model's, loaded by train's preflight
    after `check_model_source` (and the checkpoint verified against its manifest), so none of it is repeated.
    training, full fine-tuning in bf16: the weights load in fp32, and each keeps its fp32 tensor as the start of
    its master weight (train/precision.py; no more memory than the masters take anyway); False (evaluation) loads
    them in bf16 directly."""
    if config.lora_r and not importable("peft"):
        raise ValueError(NO_PEFT)
    compute_device = resolve_device(config.device)
    device = device or compute_device
    if config.load_in_4bit and (device.type != "cuda" or not importable("bitsandbytes")):
        raise ValueError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
                         "use lora_r without load_in_4bit instead")
    if config.use_liger and (device.type != "cuda" or not importable("liger_kernel")):
        raise ValueError("use_liger needs a CUDA GPU and liger-kernel (pip install liger-kernel)")
    dtype = dtype or resolve_dtype(config.dtype, compute_device)
    torch.manual_seed(config.seed)  # LoRA adapters are initialized from the global RNG
    name = config.model or str(tiny_model_path())
    full_weights = str(checkpoint) if checkpoint is not None and not config.lora_r else name
    checked = tokenizer is not None
    if tokenizer is None:
        tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    exact_masters = training and not config.lora_r and dtype == torch.bfloat16
    model = load_model(full_weights, dtype=torch.float32 if exact_masters else dtype, device=device,
                       trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit,
                       check_source=not checked)
    if exact_masters:
        to_compute_dtype(model.parameters(), dtype)
    model = prepare_model(model, config, compute_device.type, dtype, checkpoint)
    unwrap_model(model)
    return model.train(), tokenizer


def prepare_model(model, config, device_type: str, dtype: torch.dtype, checkpoint: Path | None = None, *,
                  offload=None):
    """`model` as `config` trains it on `device_type`: Liger kernels, gradient checkpointing of the first
    checkpoint_layers decoder layers (their inputs offloaded with offload_activations: through `offload`, default
    `OffloadedInputs()`), LoRA adapters (fresh from the global RNG, or `checkpoint`'s) in lora_dtype. The trainer
    applies it to loaded weights, the memory planner to a model built from its config on fake tensors."""
    from .config import resolved_checkpoint_layers

    if config.use_liger:
        apply_liger_kernels(model)
    layers = resolved_checkpoint_layers(config, len(checkpoint_layers_of(model)), device_type)
    if config.offload_activations and offload is None:
        offload = OffloadedInputs()
    enable_checkpointing(model, layers, offload if config.offload_activations else None)
    if config.lora_r:
        if checkpoint is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True,
                                              autocast_adapter_dtype=config.lora_dtype == "float32")
        else:
            model = apply_lora(model, lora_config(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                  config.lora_target_modules),
                               fp32_adapters=config.lora_dtype == "float32")
        if config.load_in_4bit and config.lora_dtype == "base":  # peft makes a 4-bit base's adapters fp32
            to_compute_dtype((p for p in model.parameters() if p.requires_grad), dtype)
    return model
