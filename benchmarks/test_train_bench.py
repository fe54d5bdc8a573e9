"""Step time and peak memory of the trainer's SDPO step against the pure-PyTorch reference step.

Run: pytest benchmarks/test_train_bench.py --benchmark-only
- CPU (anywhere): a tiny random Qwen3 (hidden 256, 4 layers) on 8 generated interactions.
- CUDA only: a Qwen3-8B-shaped LoRA step (random bf16 weights: memory and speed do not depend on them) with
  2048-token prompts and completions, the process capped at 24 GiB; the reference may run out of memory,
  which is reported, not failed.
One step = forward and backward over every micro-batch plus the optimizer step. Peak memory: growth during
the step (CUDA allocator, or process RSS in a fresh process on CPU).
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from bench_memory import cpu_peak_growth, cuda_peak_growth, subprocess_env
from sdpo_fast.data import EncodedInteraction
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.reference_step import reference_step
from sdpo_fast.train.setup import apply_lora, build_optimizer, build_scheduler, lora_config
from sdpo_fast.train.step import train_step
from sdpo_fast.train.build import objective_of, step_options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GIB = 2**30


class Size(NamedTuple):
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    interactions: int
    prompt: int
    completion: int
    lora_r: int
    cuda_only: bool = False


SIZES = [
    Size("tiny-cpu", 256, 4, 4, 2, 512, 4096, 8, 96, 64, 0),
    Size("qwen3-8b-lora", 4096, 36, 32, 8, 12288, 151936, 2, 2048, 2048, 16, cuda_only=True),
]


def build(size: Size, device: str):
    """Model (LoRA-wrapped when lora_r > 0), optimizer, scheduler and a batch of random-id interactions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen3Config(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads,
                         intermediate_size=size.intermediate, vocab_size=size.vocab, tie_word_embeddings=False)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    train_config = TrainConfig(lora_r=size.lora_r, lr=1e-5, gradient_checkpointing=device == "cuda",
                               micro_batch_tokens=2 * (size.prompt + size.completion + 64)).validate()
    if size.lora_r:
        model = apply_lora(model, lora_config(train_config.lora_r, train_config.lora_alpha, train_config.lora_dropout,
                                              train_config.lora_target_modules))
    if train_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_config.optimizer,
                                train_config.lr, train_config.weight_decay)
    scheduler = build_scheduler(optimizer, train_config.schedule, train_config.warmup_ratio, total_steps=100)
    g = torch.Generator().manual_seed(1)
    batch = []
    for _ in range(size.interactions):
        prompt = torch.randint(0, size.vocab, (size.prompt,), generator=g).tolist()
        hindsight = torch.randint(0, size.vocab, (32,), generator=g).tolist()
        completion = torch.randint(0, size.vocab, (size.completion,), generator=g).tolist()
        split = size.prompt - 8
        teacher = prompt[:split] + hindsight + prompt[split:]
        batch.append(EncodedInteraction(prompt + completion, teacher + completion, completion, split))
    return model, optimizer, scheduler, batch, train_config


def make_step(kind: str, size: Size, device: str):
    model, optimizer, scheduler, batch, config = build(size, device)

    def step():
        if kind == "trainer":
            train_step(model, batch, objective_of(config), optimizer, scheduler, step_options(config))
        else:
            reference_step(model, optimizer, scheduler, batch, max_grad_norm=config.max_grad_norm)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


@functools.cache
def peak_growth(kind: str, size: Size) -> int | None:
    """Peak memory growth of one step in bytes; None when CUDA runs out of memory."""
    if DEVICE == "cuda":
        try:
            return cuda_peak_growth(make_step(kind, size, DEVICE))
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()
    out = subprocess.run([sys.executable, __file__, json.dumps([kind, size._asdict()])], env=subprocess_env(),
                         check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("kind", ["trainer", "reference"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_train_step(benchmark, size, kind):
    if size.cuda_only and DEVICE != "cuda":
        pytest.skip("Qwen3-8B-shaped steps need a CUDA GPU")
    if DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GIB / torch.cuda.get_device_properties(0).total_memory))
    benchmark.group = f"train step {DEVICE} {size.name}"
    try:
        step = make_step(kind, size, DEVICE)
        benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{kind} step ran out of the 24 GiB cap: {str(exc).splitlines()[0]}")
    finally:
        step = None
    tokens = size.interactions * (2 * size.prompt + 32 + 2 * size.completion)
    peak = peak_growth(kind, size)
    benchmark.extra_info.update(kind=kind, size=size.name, device=DEVICE, tokens=tokens, peak_bytes=peak,
                                tokens_per_s=tokens / benchmark.stats.stats.median)


if __name__ == "__main__":  # peak_growth's CPU worker: argv[1] = JSON [kind, size fields]
    kind_name, fields = json.loads(sys.argv[1])
    worker_size = Size(**fields)
    make_step(kind_name, Size(**{**fields, "interactions": 1}), "cpu")()  # load lazily initialized code first
    print(cpu_peak_growth(make_step(kind_name, worker_size, "cpu")))
