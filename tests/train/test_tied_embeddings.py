"""Tied input/output embeddings (Qwen3-0.6B/1.7B/4B style) train correctly: one `train_step`'s gradients equal those
of the plain full-logits reference step under LoRA (adapters on the tied embedding's input side too) and under
FSDP2 (one gloo process, the tied weight gathered in the root), and the lm_head gradient reaches the one shared
parameter from both of its uses."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_conformance import interactions, reference_gradients, step_gradients  # noqa: E402

from sdpo_fast.testing import tiny_causal_lm  # noqa: E402
from sdpo_fast.train import TrainConfig  # noqa: E402

CONFIG = TrainConfig(micro_batch_tokens=100_000, max_grad_norm=None, temperature=0.9)


def _tied_model():
    model = tiny_causal_lm("qwen3", vocab_size=160, hidden_size=32, tie_word_embeddings=True,
                           initializer_range=0.2, seed=2)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def _assert_same(got: dict, expected: dict):
    assert got.keys() == {n for n, g in expected.items() if g is not None} and got
    for name, value in got.items():
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(value, expected[name], atol=2e-5 * scale, rtol=0, msg=name)


def test_tied_full_fine_tune_gradient_has_both_uses():
    """The shared weight's gradient is the lm_head's plus the embedding's: removing either changes it."""
    model = _tied_model()
    reference = copy.deepcopy(model)
    encoded = interactions()
    got = step_gradients(model, encoded, CONFIG)
    expected = reference_gradients(reference, encoded, CONFIG)
    _assert_same(got, expected)
    untied = copy.deepcopy(reference)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    partial = reference_gradients(untied, encoded, CONFIG)
    assert (partial["model.embed_tokens.weight"] - expected["model.embed_tokens.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]])
def test_tied_embeddings_under_lora(targets):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tied_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                lora_dropout=0.0))
    with torch.no_grad():  # non-zero B so that every adapter matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    reference = copy.deepcopy(model)
    encoded = interactions()
    _assert_same(step_gradients(model, encoded, CONFIG), reference_gradients(reference, encoded, CONFIG))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_tied_embeddings_under_fsdp2():
    """One gloo process: the sharded step's gradient of the tied weight equals the reference step's."""
    from torch.distributed.tensor import DTensor

    from sdpo_fast.train.distributed import shard_model

    model = _tied_model()
    reference = copy.deepcopy(model)
    encoded = interactions()
    expected = reference_gradients(reference, encoded, CONFIG)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        root = shard_model(model)
        got = {name.removeprefix("model."): grad.full_tensor() if isinstance(grad, DTensor) else grad
               for name, grad in step_gradients(root, encoded, CONFIG).items()}
    finally:
        torch.distributed.destroy_process_group()
    _assert_same(got, expected)


def test_an_adapter_on_the_tied_lm_head_is_refused():
    """With peft's ensure_weight_tying an embedding adapter reaches the lm_head too, whose output is then no longer
    weight @ h: refused by name instead of computed from the bare weight."""
    peft = pytest.importorskip("peft")
    from sdpo_fast.model import forward_micro_batch

    try:
        config = peft.LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True)
    except TypeError:
        pytest.skip("this peft has no ensure_weight_tying")
    model = peft.get_peft_model(_tied_model(), config)
    if not hasattr(model.get_base_model().get_output_embeddings(), "base_layer"):
        pytest.skip("this peft leaves the tied lm_head without an adapter")
    with pytest.raises(ValueError, match="lm_head carries an adapter"):
        forward_micro_batch(model, interactions())
