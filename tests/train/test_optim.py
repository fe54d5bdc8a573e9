"""The optimizer stepped in backward against a plain optimizer step (weights after several steps, resume
included), its per-parameter clipping against clipping by hand, and the offload option's errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_fast.data import sample_path
from sdpo_fast.train import TrainConfig, train
from sdpo_fast.train.optim import OptimizerInBackward, offload_optimizer


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:5]))
    return str(path)


def _run(model_dir, data_path, out, stop_after=None, **options):
    """micro_batch_tokens 1: one micro-batch per interaction, so gradients accumulate before the update."""
    config = TrainConfig(model=model_dir, data=data_path, output_dir=str(out), batch_size=2, epochs=2, lr=1e-3,
                         micro_batch_tokens=1, save_steps=2, seed=7, max_grad_norm=None, optimizer="adamw",
                         dtype="float32", device="cpu", **options)
    return train(config, progress=False, stop_after=stop_after)


def test_optimizer_in_backward_equals_a_plain_step_including_resume(tmp_path, model_dir, data_path):
    plain = _run(model_dir, data_path, tmp_path / "plain")
    _run(model_dir, data_path, tmp_path / "fused", stop_after=3, optimizer_in_backward=True)
    fused = _run(model_dir, data_path, tmp_path / "fused", resume=True, optimizer_in_backward=True)
    assert fused["steps"] == plain["steps"] == 6
    a = load_file(Path(plain["checkpoint"]) / "model.safetensors")
    b = load_file(Path(fused["checkpoint"]) / "model.safetensors")
    start = load_file(Path(model_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert not torch.equal(a[name], start[name]) or "norm" in name
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7 * a[name].abs().max().item())
    assert plain["last"]["grad_norm"] == pytest.approx(fused["last"]["grad_norm"], rel=1e-5)


def test_each_parameter_is_clipped_on_its_own():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    before = [p.detach().clone() for p in params]
    optimizer = OptimizerInBackward(params, lambda ps: torch.optim.SGD(ps, lr=1.0), max_grad_norm=0.5)
    grads = [torch.randn(5) * 3, torch.randn(3, 2) * 0.01]
    (sum((p * g).sum() for p, g in zip(params, grads))).backward()
    for p, b, g in zip(params, before, grads):
        clipped = g * min(1.0, 0.5 / (g.norm().item() + 1e-6))
        torch.testing.assert_close(p.detach(), b - clipped)
        assert p.grad is None
    expected = torch.sqrt(sum(g.double().norm() ** 2 for g in grads))
    torch.testing.assert_close(optimizer.take_grad_norm(), expected)


def test_offload_needs_torchao_and_cuda():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="torchao|CUDA"):
        offload_optimizer(params, "adamw", 1e-3, 0.0)
    with pytest.raises(ValueError, match="unset optimizer_in_backward"):
        TrainConfig(optimizer_in_backward=True, offload_optimizer=True).validate()


def test_bf16_parameters_step_in_backward_through_their_fp32_masters():
    """bf16 weights (CUDA's default dtype): the in-backward step takes the gradient from the fp32 master it was
    moved to, and ends where a plain step of the same masters does (two micro-batches accumulated first)."""
    from sdpo_fast.train.setup import build_optimizer

    torch.manual_seed(0)
    start = torch.randn(6, 4).to(torch.bfloat16)
    grads = [torch.randn(6, 4) for _ in range(2)]
    fused, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    in_backward = OptimizerInBackward([fused], lambda ps: build_optimizer(ps, "adamw", 1e-2, 0.0), max_grad_norm=None)
    reference = build_optimizer([plain], "adamw", 1e-2, 0.0)
    for k, g in enumerate(grads):
        in_backward.final_backward = k == len(grads) - 1
        (fused * g.to(torch.bfloat16)).sum().backward()
        (plain * g.to(torch.bfloat16)).sum().backward()
    reference.step()
    assert torch.equal(fused.detach(), plain.detach()) and not torch.equal(fused.detach(), start)
    assert in_backward.inner[0].param_groups[0]["params"][0].grad is None
