"""Builders shared by the serve tests: a Service on the bundled tiny model with the demo's settings, and the base
model's reply computed independently (plain HF generate, seeded as the service seeds a user's n-th reply)."""
from __future__ import annotations

import functools

from sdpo_fast.cli.online import _load
from sdpo_fast.demo import online_demo_settings
from sdpo_fast.model.generation import sample_batch
from sdpo_fast.online.config import resolve_online_config

MODEL = "tiny"
X = [{"role": "user", "content": "Tell me about volcanoes."}]


def make_service(state_dir, **options):
    from sdpo_fast.serve.app import Service

    model, tokenizer = _load(None, "cpu", 0)
    config = resolve_online_config(defaults=online_demo_settings(False))
    return Service(state_dir, model, tokenizer, config, model_name=MODEL, learn=options.pop("learn", False),
                   log=lambda line: None, **options)


@functools.lru_cache(maxsize=1)
def _base():
    return _load(None, "cpu", 0)


def reference_reply(messages, count: int, max_new_tokens: int | None = None) -> tuple[str, tuple]:
    """The base model's sample for a user's `count`-th reply, by plain HF generate (seed as the service's)."""
    model, tokenizer = _base()
    config = resolve_online_config(defaults=online_demo_settings(False))
    stops = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    sample = sample_batch(model, tokenizer, [messages], max_new_tokens=max_new_tokens or config.max_new_tokens,
                          temperature=config.temperature, seed=config.seed * 1_000_003 + count,
                          stop_token_ids=stops)[0]
    return sample.text, sample.token_ids
