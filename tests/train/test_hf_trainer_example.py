"""examples/hf_trainer_compute_loss.py: its compute_loss equals the reference step loss and gradient."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from sdpo_fast.data import encode_interactions, load_interactions, sample_path
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from sdpo_fast.train import reference_loss

_PATH = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_compute_loss.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_compute_loss", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_compute_loss_matches_reference():
    example = _example()
    encoded, _ = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:4])
    model = tiny_causal_lm("qwen3", initializer_range=0.2).train()
    ref = copy.deepcopy(model)
    loss = example.SDPOTrainer.compute_loss(None, model, example.collate([vars(e) for e in encoded]))
    loss.backward()
    expected = reference_loss(ref, encoded, ignore_first_k=example.IGNORE_FIRST_K)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-5, rtol=1e-4)


def test_example_runs_a_trainer():
    assert _example().main(["--steps", "1"]) > 0
