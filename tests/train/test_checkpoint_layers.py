"""checkpoint_layers (the first N decoder layers checkpointed) and offload_activations: the step's gradients
against the same step with no checkpointing, the simulated peak as layers are checkpointed, and the refusals (the
simulated step equals the counted real one in tests/train/test_plan.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import CaptureGrads

from sdpo_fast.data import encode_interactions, load_interactions, sample_path
from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.model import OffloadedInputs, checkpoint_layers_of
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from sdpo_fast.train import TrainConfig, objective_of, step_options, train_step
from sdpo_fast.train.config import resolved_checkpoint_layers
from sdpo_fast.train.plan import simulate
from sdpo_fast.train.setup import check_model_options, prepare_model
from sdpo_fast.train.teachers import Teacher

LAYERS = 3
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def batch():
    items, _ = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:2])
    return items


class CountingOffload(OffloadedInputs):
    """`OffloadedInputs` counting the moves; on "cpu" a copy stands for the host copy."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__(device_types=(device_type,))
        self.packed = self.fetched = 0

    def to_host(self, x):
        self.packed += 1
        return super().to_host(x)

    def to_device(self, held):
        self.fetched += 1
        return super().to_device(held)


def _step_grads(config: TrainConfig, batch, teacher_kind: str, offload=None, device: str = "cpu"):
    """Gradients of one SDPO step (prefix-reusing live teacher, or an ema/base teacher) of the tiny model
    prepared by `config`, and how often each decoder layer ran forward (its MLP: a recompute calls the layer's
    forward, not its hooks)."""
    torch.manual_seed(0)  # LoRA adapters are initialized from the global RNG
    model = prepare_model(tiny_causal_lm("qwen3", num_layers=LAYERS, initializer_range=0.2, seed=1), config, "cpu",
                          torch.float32, offload=offload).to(device).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    calls = [0] * LAYERS
    for i, layer in enumerate(checkpoint_layers_of(model)):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    teacher = Teacher(model, teacher_kind, ema_rate=0.05) if teacher_kind != "live" else None
    optimizer = CaptureGrads(p for p in model.parameters() if p.requires_grad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    options = dataclasses.replace(step_options(config), max_grad_norm=None, attn_backend="sdpa", micro_batch_tokens=400)
    train_step(model, batch, objective_of(config), optimizer, scheduler, options, teacher=teacher)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[i]: g.cpu() for i, g in optimizer.grads.items()}, calls


@pytest.mark.parametrize("lora_r, layers, offload, teacher", [
    (0, 1, False, "live"), (0, 2, True, "ema"), (4, 1, True, "base"),
])
def test_gradients_equal_the_step_without_checkpointing(lora_r, layers, offload, teacher, batch):
    base = dict(ignore_first_k=0, loss_backend="torch", lora_r=lora_r)
    plain, plain_calls = _step_grads(TrainConfig(**base, checkpoint_layers=0), batch, teacher)
    counting = CountingOffload() if offload else None
    got, calls = _step_grads(TrainConfig(**base, checkpoint_layers=layers, offload_activations=offload), batch,
                             teacher, counting)
    passes = plain_calls[0]
    micro_batches = calls[0] - passes  # each checkpointed layer runs again in each micro-batch's backward
    assert micro_batches >= 1
    assert calls == [passes + micro_batches] * layers + [passes] * (LAYERS - layers)
    if offload:  # one input per checkpointed layer and micro-batch left and came back
        assert counting.packed == counting.fetched == layers * micro_batches
    assert got.keys() == plain.keys() and got
    for name, grad in plain.items():
        scale = max(grad.abs().max().item(), 1e-8)
        assert (got[name] - grad).abs().max().item() <= 1e-6 * scale, name


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("lora_r", [0, 4])
def test_cuda_offloaded_inputs_come_back_for_the_recompute(lora_r, batch):
    """Pinned host copies on side streams: the same gradients as the step without checkpointing."""
    base = dict(ignore_first_k=0, loss_backend="torch", lora_r=lora_r)
    plain, _ = _step_grads(TrainConfig(**base, checkpoint_layers=0), batch, "live", device="cuda")
    counting = CountingOffload("cuda")
    got, _ = _step_grads(TrainConfig(**base, checkpoint_layers=2, offload_activations=True), batch, "live",
                         counting, device="cuda")
    assert counting.packed == counting.fetched >= 2
    for name, grad in plain.items():
        scale = max(grad.abs().max().item(), 1e-8)
        assert (got[name] - grad).abs().max().item() <= 1e-5 * scale, name


def _tiny_config():
    return tiny_causal_lm("qwen3", hidden_size=64, num_layers=LAYERS, vocab_size=300).config


def _config(**options):
    base = dict(model="tiny", max_prompt_tokens=100, max_completion_tokens=60, micro_batch_tokens=200,
                batch_size=4, dtype="float32", optimizer="adamw")
    return TrainConfig(**{**base, **options}).validate()


@pytest.mark.slow
def test_peak_falls_as_more_layers_are_checkpointed_and_with_offload():
    peaks = [simulate(_config(lora_r=4, checkpoint_layers=k), _tiny_config()) for k in range(LAYERS + 1)]
    assert all(a.peak_bytes > b.peak_bytes for a, b in zip(peaks, peaks[1:])), [p.peak_bytes for p in peaks]
    # offloaded: the forward keeps no layer input; backward holds two (the recomputed one, the next prefetched)
    offloaded = simulate(_config(lora_r=4, checkpoint_layers=LAYERS, offload_activations=True), _tiny_config())
    kept = peaks[-1]
    assert offloaded.breakdown["checkpointed_inputs"] < kept.breakdown["checkpointed_inputs"]
    assert offloaded.phases["student forward"] < kept.phases["student forward"]
    assert offloaded.peak_bytes <= kept.peak_bytes


def test_resolution_and_refusals():
    assert resolved_checkpoint_layers(TrainConfig(lora_r=16), 36) == 36
    assert resolved_checkpoint_layers(TrainConfig(lora_r=16), 36, "cpu") == 0
    assert resolved_checkpoint_layers(TrainConfig(gradient_checkpointing=True, checkpoint_layers=5), 36) == 5
    assert TrainConfig(checkpoint_layers=0, lora_r=16).checkpointing_on("cuda") is False
    for options in (dict(gradient_checkpointing=True, checkpoint_layers=0),
                    dict(gradient_checkpointing=False, checkpoint_layers=2)):
        with pytest.raises(ValueError, match="gradient_checkpointing .* contradicts checkpoint_layers"):
            TrainConfig(**options).validate()
    with pytest.raises(ValueError, match="checkpoint_layers must be an integer >= 0"):
        TrainConfig(checkpoint_layers=-1).validate()
    with pytest.raises(ValueError, match="offload_activations .* checkpoint_layers is 0"):
        TrainConfig(checkpoint_layers=0, offload_activations=True).validate()
    with pytest.raises(ValueError, match="offload_activations .* no layer is checkpointed"):
        resolved_checkpoint_layers(TrainConfig(offload_activations=True), 36, "cpu")
    with pytest.raises(ValueError, match=f"checkpoint_layers {LAYERS + 1} exceeds the model's {LAYERS} decoder"):
        simulate(_config(checkpoint_layers=LAYERS + 1), _tiny_config())
    bundled = tiny_model_path()  # train's preflight, from config.json before the weights load
    layers = json.loads((bundled / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(ValueError, match=f"checkpoint_layers {layers + 1} exceeds the model's {layers} decoder"):
        check_model_options(TrainConfig(checkpoint_layers=layers + 1), str(bundled))
    check_model_options(TrainConfig(checkpoint_layers=layers), str(bundled))
