"""Step time and peak memory of the trainer's SDPO step against the pure-PyTorch reference step.

Run: pytest benchmarks/test_train_bench.py --benchmark-only
- CPU (anywhere): a tiny random Qwen3 (hidden 256, 4 layers) on 8 generated interactions.
- CUDA only: a Qwen3-8B-shaped LoRA r16 step at the planner's settings (`sdpo-fast plan --model qwen3-8b
  --lora-r 16`: TrainConfig defaults, its worst-case batch of 2048 + 2048-token interactions, two micro-batches
  of 8192 tokens), random weights built directly in bf16 (memory and speed do not depend on them), the process
  capped at 24 GiB; the reference may run out of memory, which is reported, not failed.
One step = forward and backward over every micro-batch plus the optimizer step. Peak memory: growth during
the step over the model, optimizer and batch (CUDA allocator, measured around the timed steps; process RSS in a
fresh process on CPU).
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from bench_memory import cpu_peak_growth, cuda_peak_growth, subprocess_env
from sdpo_fast.data import EncodedInteraction
from sdpo_fast.model import enable_checkpointing
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.plan import worst_case_batch
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
    interactions: int  # 0: the planner's worst-case batch (train/plan.py) at TrainConfig's limits
    prompt: int
    completion: int
    lora_r: int
    cuda_only: bool = False


SIZES = [
    Size("tiny-cpu", 256, 4, 4, 2, 512, 4096, 8, 96, 64, 0),
    Size("qwen3-8b-lora", 4096, 36, 32, 8, 12288, 151936, 0, 2048, 2048, 16, cuda_only=True),
]


def build(size: Size, device: str):
    """Model (LoRA-wrapped when lora_r > 0), optimizer, scheduler and a batch of random-id interactions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen3Config(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads,
                         intermediate_size=size.intermediate, vocab_size=size.vocab, tie_word_embeddings=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: an fp32 Qwen3-8B (30.5 GiB) would not fit the 24 GiB cap
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if size.interactions:
        train_config = TrainConfig(lora_r=size.lora_r, lr=1e-5, gradient_checkpointing=device == "cuda",
                                   micro_batch_tokens=2 * (size.prompt + size.completion + 64)).validate()
    else:
        train_config = TrainConfig(lora_r=size.lora_r, max_prompt_tokens=size.prompt,
                                   max_completion_tokens=size.completion).validate()
    if size.lora_r:
        model = apply_lora(model, lora_config(train_config.lora_r, train_config.lora_alpha, train_config.lora_dropout,
                                              train_config.lora_target_modules))
    if train_config.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_config.optimizer,
                                train_config.lr, train_config.weight_decay)
    scheduler = build_scheduler(optimizer, train_config.schedule, train_config.warmup_ratio, total_steps=100)
    if not size.interactions:
        return model, optimizer, scheduler, worst_case_batch(train_config, size.vocab), train_config
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
    """One step of `kind` ("trainer" or "reference") as a callable; its `tokens`: student + teacher tokens."""
    model, optimizer, scheduler, batch, config = build(size, device)

    def step():
        if kind == "trainer":
            train_step(model, batch, objective_of(config), optimizer, scheduler, step_options(config))
        else:
            reference_step(model, optimizer, scheduler, batch, max_grad_norm=config.max_grad_norm)
        if device == "cuda":
            torch.cuda.synchronize()

    step.tokens = sum(len(e.student_input_ids) + len(e.teacher_input_ids) for e in batch)
    return step


def cpu_peak_growth_of_step(kind: str, size: Size) -> int:
    """Peak RSS growth of one CPU step, in a fresh process."""
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
    step = None
    try:
        step = make_step(kind, size, DEVICE)
        tokens = step.tokens
        if DEVICE == "cuda":  # the peak of the timed steps (the first creates the optimizer state), no second model
            peak = cuda_peak_growth(lambda: benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1))
        else:
            benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
            peak = cpu_peak_growth_of_step(kind, size)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{kind} step ran out of the 24 GiB cap: {str(exc).splitlines()[0]}")
    finally:
        step = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    benchmark.extra_info.update(kind=kind, size=size.name, device=DEVICE, tokens=tokens, peak_bytes=peak,
                                tokens_per_s=tokens / benchmark.stats.stats.median)


if __name__ == "__main__":  # peak_growth's CPU worker: argv[1] = JSON [kind, size fields]
    kind_name, fields = json.loads(sys.argv[1])
    worker_size = Size(**fields)
    make_step(kind_name, Size(**{**fields, "interactions": 1}), "cpu")()  # load lazily initialized code first
    print(cpu_peak_growth(make_step(kind_name, worker_size, "cpu")))
