"""The bundled tiny default (sdpo_fast/assets/): a tiny Qwen3 and the sample of conversations it runs on."""
from __future__ import annotations

import importlib.resources
from pathlib import Path


def tiny_model_path() -> Path:
    """The tiny Qwen3 and its tokenizer (made by scripts/make_tiny_model.py; see its README.md)."""
    return Path(str(importlib.resources.files("sdpo_fast").joinpath("assets", "tiny_model")))


def tiny_sample_path() -> Path:
    """The default data: `demo.sample.generate_preference_conversations(STYLE_SAMPLE_SIZE)` as JSONL."""
    return Path(str(importlib.resources.files("sdpo_fast").joinpath("assets", "tiny_sample.jsonl")))
