"""A training step queues its GPU work without waiting: under a dispatch mode that counts the operations that
force a device->host synchronization on CUDA (scalar reads, nonzero, boolean-mask indexing, repeat_interleave
without an output size, tensors from host data outside the pinned `upload`), a whole step issues none, and
reads its statistics once at the end."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sdpo_fast.data import encode_interactions, load_interactions, sample_path
from sdpo_fast.model import enable_checkpointing
from sdpo_fast.online import loop
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, PendingInteraction
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from sdpo_fast.train import TrainConfig, apply_lora, lora_config, objective_of, step, step_options, train_step
from sdpo_fast.utils.device import count_syncs, upload


@pytest.fixture(scope="module")
def batch():
    encoded, _ = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:6])
    return encoded


def _reads(monkeypatch, module) -> list[int]:
    reads = []
    original = module.read_totals
    monkeypatch.setattr(module, "read_totals", lambda totals: reads.append(1) or original(totals))
    return reads


@pytest.mark.parametrize("loss, lora, checkpointing, importance_clip", [
    ("sdpo", False, False, None), ("sdpo", True, True, None), ("sft", False, False, None),
    ("sdpo", False, False, 2.0)])
def test_offline_step_synchronizes_once(batch, monkeypatch, loss, lora, checkpointing, importance_clip):
    if importance_clip is not None:
        batch = [dataclasses.replace(e, behavior_logprobs=[-1.0] * len(e.completion_ids)) for e in batch]
    model = tiny_causal_lm("qwen3").train()
    if checkpointing:
        enable_checkpointing(model)
    if lora:
        model = apply_lora(model, lora_config(4, 8.0, 0.0, "all-linear"))
    config = TrainConfig(loss=loss, micro_batch_tokens=300, ignore_first_k=2, max_grad_norm=1.0,
                         importance_clip=importance_clip)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    reads = _reads(monkeypatch, step)
    with count_syncs() as counter:
        stats = train_step(model, batch, objective_of(config), optimizer, scheduler, step_options(config))
    assert counter.count == 0, dict(counter.where)
    assert reads == [1] and stats.loss_tokens > 0


def test_online_update_synchronizes_once(monkeypatch):
    tokenizer = tiny_tokenizer("qwen3")
    policy = OnlinePolicy(tiny_causal_lm("qwen3"), tokenizer, OnlineConfig(lora_r=0, update_every=3), adapter_name=None)
    policy.optimizer = torch.optim.SGD(policy.parameters, lr=1e-3)
    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda _: 1.0)
    items = list(load_interactions(sample_path()))[:3]
    policy.pending = [PendingInteraction(i, None) for i in items]
    reads = _reads(monkeypatch, step)
    with count_syncs() as counter:
        stats = policy.update()
    assert counter.count == 0, dict(counter.where)
    assert reads == [1] and stats["interactions"] == 3
    assert loop.train_step is train_step


def test_the_counter_sees_what_syncs():
    x = torch.arange(6.0)
    with count_syncs() as counter:
        float(x.sum())
        x[x > 2]
        (x > 1).nonzero()
        torch.tensor([1, 2])
        upload([1, 2], torch.long, "cpu")
        torch.repeat_interleave(torch.arange(2), upload([1, 2], torch.long, "cpu"))
    assert [name for name, _ in counter.where] == [
        "aten._local_scalar_dense.default", "aten.index.Tensor", "aten.nonzero.default", "aten.lift_fresh.default",
        "aten.repeat_interleave.Tensor"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_passes_the_sync_debug_mode(batch):
    """On a GPU, torch's own detector: a synchronizing call inside the step raises (the statistics read excepted)."""
    model = tiny_causal_lm("qwen3").cuda().train()
    config = TrainConfig(micro_batch_tokens=300, ignore_first_k=2, max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train_step(model, batch, objective_of(config), optimizer, scheduler, step_options(config))  # warm-up
    original = step.read_totals

    def read_outside(totals):
        torch.cuda.set_sync_debug_mode(0)
        return original(totals)

    step.read_totals = read_outside
    try:
        torch.cuda.set_sync_debug_mode("error")
        train_step(model, batch, objective_of(config), optimizer, scheduler, step_options(config))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        step.read_totals = original
