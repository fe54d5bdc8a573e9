"""Builders shared by the serve tests: a Service on the bundled tiny model with the demo's settings, and the base
model's reply computed independently (plain HF generate: seeded as the service seeds a user's n-th reply, or
greedy)."""
from __future__ import annotations

import functools

import torch

from sdpo_fast.cli.online import _load
from sdpo_fast.demo import online_demo_settings
from sdpo_fast.model.generation import chat_prompt_ids, sample_batch
from sdpo_fast.online.config import resolve_online_config

MODEL = "tiny"
X = [{"role": "user", "content": "Tell me about volcanoes."}]


def make_service(state_dir, config: dict | None = None, **options):
    """A Service on the bundled model; config: OnlineConfig fields over the demo's settings."""
    from sdpo_fast.serve.app import Service

    model, tokenizer = _load(None, "cpu", 0)
    config = resolve_online_config(config, defaults=online_demo_settings(False))
    return Service(state_dir, model, tokenizer, config, model_name=MODEL, learn=options.pop("learn", False),
                   log=lambda line: None, **options)


@functools.lru_cache(maxsize=1)
def _base():
    return _load(None, "cpu", 0)


def _stop_ids(tokenizer) -> list[int]:
    """The ids the service stops a reply at: eos and the chat template's end of turn."""
    return sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})


def reference_reply(messages, count: int, max_new_tokens: int | None = None) -> tuple[str, tuple]:
    """The base model's sample for a user's `count`-th reply, by plain HF generate (seed as the service's)."""
    model, tokenizer = _base()
    config = resolve_online_config(defaults=online_demo_settings(False))
    sample = sample_batch(model, tokenizer, [messages], max_new_tokens=max_new_tokens or config.max_new_tokens,
                          temperature=config.temperature, seed=config.seed * 1_000_003 + count,
                          stop_token_ids=_stop_ids(tokenizer))[0]
    return sample.text, sample.token_ids


def greedy_reply(messages, max_new_tokens: int) -> tuple[int, ...]:
    """The base model's greedy reply ids by a plain HF generate (do_sample=False), through its first stop token."""
    model, tokenizer = _base()
    stops = _stop_ids(tokenizer)
    prompt = torch.tensor(chat_prompt_ids(tokenizer, [messages]))
    ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
    ends = [i for i, t in enumerate(ids) if t in stops]
    return tuple(ids[:ends[0] + 1] if ends else ids)
