"""Interactions per second of the online SDPO loop (generation, rule-based user, update) on the bundled tiny model.

Run: pytest benchmarks/test_online_bench.py --benchmark-only
One round = `update_every` prompts answered together, the user's replies, and one SDPO update (LoRA r 8), with
the CPU demo's settings (one thread on CPU). extra_info holds interactions/s, and the share of the round spent generating.
"""
from __future__ import annotations

import time

import pytest
import torch

from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.demo.report import demo_prompts
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config, prompt_messages
from sdpo_fast.online.personas import get_persona
from sdpo_fast.online.users import RuleUser
from sdpo_fast.demo.threads import single_thread

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("update_every, max_new_tokens", [(4, 48), (16, 48), (16, 96)])
def test_online_interactions_per_second(benchmark, update_every, max_new_tokens):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path()).to(DEVICE)
    config = OnlineConfig(update_every=update_every, lr=2e-3, lora_r=8, lora_alpha=16.0,
                          max_new_tokens=max_new_tokens).validate()
    policy = OnlinePolicy(get_peft_model(model, lora_config(config)), tokenizer, config)
    user = RuleUser(get_persona("no-emojis"))
    prompts, _ = demo_prompts(0, 1)
    generating = []
    respond = policy._sample

    def timed_sample(conversations):
        start = time.perf_counter()
        out = respond(conversations)
        generating.append(time.perf_counter() - start)
        return out

    policy._sample = timed_sample

    def round_():
        batch = [prompt_messages(prompts[(policy.generations + j) % len(prompts)]) for j in range(update_every)]
        out = policy.interact_batch(batch, user)
        assert out[-1]["update"] is not None or not out[-1]["response"]

    with single_thread(DEVICE == "cpu"):
        benchmark.pedantic(round_, rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(device=DEVICE, interactions_per_s=round(update_every / seconds, 2),
                                generation_share=round(min(generating) / seconds, 2))
