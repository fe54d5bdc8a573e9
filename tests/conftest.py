import os

import torch

# Triton decides whether kernels are interpreted when it is imported and when kernels are decorated, so the
# flag is set, and triton imported, before any test can change the environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401
except ImportError:
    pass

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (reproducible CI); explore with --hypothesis-seed=N.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A saved tiny random Qwen3 (context-sensitive init) and its chat tokenizer, as a local model directory."""
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm("qwen3", initializer_range=0.2, seed=3).save_pretrained(path)
    tiny_tokenizer("qwen3").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_path(tmp_path_factory) -> str:
    """The first five rows of the shipped synthetic sample, as a JSONL file."""
    from sdpo_fast.data import sample_path

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:5]))
    return str(path)
