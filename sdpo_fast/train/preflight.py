"""Everything `train` checks before the weights load, each check run once: the config (`TrainConfig.validate`),
what a torchrun job cannot run, the run directory and resume (train/rundir.py), the optimizer's package, the
loss and attention backends, the reporters, the model source, whether sdpo_fast serves the model (its family,
head and attention) and the options its config bounds (top-k within the vocabulary), the tokenizer (loaded once, and handed on), the
data (encoded once) with the sampler's log-probs importance clipping needs, and on CUDA the memory plan. Nothing
is written to the output directory before they pass."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..data import EncodedInteraction
from ..demo.assets import tiny_model_path
from ..loss import resolve_backend
from ..model.attention import check_backend as check_attn_backend
from ..model.support import check_model_name
from .build import load_encoded_data
from .config import TrainConfig
from .distributed import World, check_distributed, launched_world
from .plan import check_fits
from .reporting import check_reporters
from .rundir import RunDirectory, open_run_directory
from .setup import (NO_BNB, check_model_options, check_model_source, importable, load_tokenizer, resolve_device,
                    resolve_dtype)

_PROBE = "Hello, world"


@dataclass(frozen=True)
class Checked:
    """What the checks found, handed on so nothing is looked up twice: the run directory (with the checkpoint
    to resume), the tokenizer, the encoded interactions and the data loader's counts."""

    run: RunDirectory
    tokenizer: object
    encoded: list[EncodedInteraction]
    counts: dict


def check_launch(config: TrainConfig) -> World | None:
    """`config` validated and, under torchrun, checked for what a sharded job cannot run; the job's world (not
    joined yet) or None."""
    config.validate()
    world = launched_world()
    if world is not None:
        check_distributed(config)
    return world


def preflight(config: TrainConfig, world: World | None, log) -> Checked:
    """The checks after `check_launch`, in order, each once; ValueError (one line, naming the option and the fix)
    at the first that fails."""
    run = open_run_directory(config, world, log)
    if config.optimizer == "adamw8bit" and not importable("bitsandbytes"):
        raise ValueError(NO_BNB)
    check_backends(config)
    check_reporters(config.report_to)
    name = config.model or str(tiny_model_path())
    check_model_source(name)
    check_model_name(name, **model_check_options(config))
    check_model_options(config, name)
    tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code, check_source=False)
    check_tokenizer(tokenizer, name)
    encoded, counts = load_encoded_data(config, tokenizer)
    check_behavior_logprobs(config, encoded)
    check_memory(config)
    return Checked(run, tokenizer, encoded, counts)


def check_backends(config: TrainConfig) -> None:
    """ValueError naming loss_backend/attn_backend when it cannot run on the configured device (attention: in the
    configured dtype, on that GPU's compute capability), before weights load."""
    device = resolve_device(config.device)
    if config.loss == "sdpo":
        try:
            resolve_backend(config.loss_backend, device)
        except ValueError as exc:
            raise ValueError(f"loss_backend {config.loss_backend!r} cannot run on {device.type}: {exc}") from None
    check_attn_backend(config.attn_backend, device, resolve_dtype(config.dtype, device))


def model_check_options(config: TrainConfig) -> dict:
    """`check_model_name`'s options for the model of `config`: its attention backend, device and dtype."""
    device = resolve_device(config.device)
    return dict(attn_backend=config.attn_backend, device=device, dtype=resolve_dtype(config.dtype, device),
                trust_remote_code=config.trust_remote_code)


def check_tokenizer(tokenizer, name: str) -> None:
    """ValueError unless `tokenizer` encodes text to tokens and its chat template round-trips a message."""
    if not tokenizer.encode(_PROBE, add_special_tokens=False):
        raise ValueError(f"model {name!r}: its tokenizer encodes text to zero tokens (tokenizer files missing or "
                         "broken); use a model directory with tokenizer.json (or tokenizer.model)")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model {name!r}: its tokenizer has no chat template; use an instruct/chat model")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids)
    except Exception as exc:  # a template that cannot render is reported with its error, as one line
        raise ValueError(f"model {name!r}: its chat template fails ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if _PROBE not in back:
        raise ValueError(f"model {name!r}: its tokenizer cannot round-trip the chat template (a message encoded "
                         "and decoded does not come back); check its tokenizer files")


def check_behavior_logprobs(config: TrainConfig, encoded: list[EncodedInteraction]) -> None:
    """With importance_clip, ValueError unless every encoded interaction has the sampler's log-probs."""
    if config.importance_clip is None:
        return
    missing = sum(e.behavior_logprobs is None for e in encoded)
    if missing:
        raise ValueError(f"importance_clip needs the sampler's log-probs of every completion, but {missing} of the "
                         f"{len(encoded)} encoded interactions have none: give each assistant message \"token_ids\" "
                         "and \"logprobs\" (one per token, as a vLLM/TRL rollout log holds them), or unset "
                         "importance_clip")


def check_memory(config: TrainConfig) -> None:
    """Before any CUDA allocation: expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set; on CUDA, with
    check_memory, the simulated step against the card's free memory (see `plan.check_fits`; one process only: a
    torchrun job's share is `sdpo-fast plan --world-size N`)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if resolve_device(config.device).type != "cuda":
        return
    if config.check_memory and launched_world() is None:
        check_fits(dataclasses.replace(config, model=config.model or str(tiny_model_path())),
                   torch.cuda.mem_get_info()[0])
