"""`train_step` against the pure-PyTorch reference step (plain per-sequence forwards with full logits)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import CaptureGrads

from sdpo_fast.data import EncodedInteraction, encode_interactions, load_interactions, sample_path
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from sdpo_fast.loss import sft as sft_module
from sdpo_fast.loss import sft_loss
from sdpo_fast.model import passes
from sdpo_fast.train import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    interaction_weights,
    objective_of,
    reference_loss,
    reference_step,
    step_options,
    train_step,
)


def _step_grads(model, batch, config: TrainConfig):
    """train_step's stats and the gradients its optimizer step saw (no clipping)."""
    optimizer = CaptureGrads(p for p in model.parameters() if p.requires_grad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = train_step(model, batch, objective_of(config), optimizer, scheduler,
                       dataclasses.replace(step_options(config), max_grad_norm=None))
    names = {id(p): n for n, p in model.named_parameters()}
    return stats, {names[i]: g for i, g in optimizer.grads.items()}


def _optimizer(model, config: TrainConfig):
    return build_optimizer([p for p in model.parameters() if p.requires_grad], config.optimizer, config.lr,
                           config.weight_decay)


def _scheduler(optimizer, config: TrainConfig, total_steps: int):
    return build_scheduler(optimizer, config.schedule, config.warmup_ratio, total_steps)


@pytest.fixture(scope="module")
def batch() -> list[EncodedInteraction]:
    """Five sample interactions plus edge cases: a completion shorter than ignore_first_k, and one of
    length ignore_first_k + 1 (a single loss token)."""
    items, skipped = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:5])
    assert not skipped
    short = EncodedInteraction([5, 6, 7, 40, 41], [5, 6, 9, 40, 41], [40, 41], 2)
    single = EncodedInteraction([5, 8, 40, 41, 42], [5, 8, 11, 12, 40, 41, 42], [40, 41, 42], 2)
    return items + [short, single]


def _model(lora: bool = False):
    model = tiny_causal_lm("qwen3", initializer_range=0.2, seed=1).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():  # non-zero B so the adapters change the outputs and get gradients in A
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference_grads(model, batch, config: TrainConfig) -> dict[str, torch.Tensor]:
    reference_loss(model, batch, loss=config.loss, aggregation=config.aggregation,
                   ignore_first_k=config.ignore_first_k, temperature=config.temperature,
                   signal_clip=config.signal_clip).backward()
    return _grads(model)


def _assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 1e-4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5 * scale, rtol=1e-4, msg=name)


def test_test_model_is_context_sensitive(batch):
    """Student and teacher scores differ, so SDPO gradients are not trivially zero or equal to SFT's."""
    model = _model()
    with torch.no_grad():
        sdpo = reference_loss(model, batch[:3])
        sft = reference_loss(model, batch[:3], loss="sft")
    assert abs(sdpo.item()) > 1e-3 and abs(sdpo.item() - sft.item()) > 1e-2


@pytest.mark.parametrize("options", [
    dict(),
    dict(aggregation="token"),
    dict(temperature=1.7, signal_clip=0.3, ignore_first_k=0),
    dict(loss="sft"),
    dict(loss="sft", aggregation="token", ignore_first_k=5),
], ids=["sdpo-sequence", "sdpo-token", "sdpo-clip-temp", "sft-sequence", "sft-token-k5"])
def test_step_gradient_equals_reference(batch, options):
    config = TrainConfig(micro_batch_tokens=400, **options)
    model = _model()
    ref = copy.deepcopy(model)
    stats, grads = _step_grads(model, batch, config)
    _assert_grads_close(grads, _reference_grads(ref, batch, config))
    with torch.no_grad():
        expected_loss = reference_loss(ref, batch, **{k: getattr(config, k) for k in (
            "loss", "aggregation", "ignore_first_k", "temperature", "signal_clip")})
    assert stats.loss == pytest.approx(expected_loss.item(), rel=1e-4, abs=1e-6)
    k = config.ignore_first_k
    assert stats.loss_tokens == sum(max(len(e.completion_ids) - k, 0) for e in batch)
    signals = torch.cat([_reference_signal(ref, e, config)[k:] for e in batch])
    assert stats.mean_signal == pytest.approx(signals.mean().item(), abs=1e-5)
    assert stats.positive == int((signals > 0).sum())
    teacher_tokens = sum(len(e.teacher_input_ids) for e in batch) if config.loss == "sdpo" else 0
    assert stats.tokens == sum(len(e.student_input_ids) for e in batch) + teacher_tokens


def test_sft_runs_no_teacher_pass(batch, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the SFT step ran a teacher pass")

    monkeypatch.setattr(passes, "teacher_hidden_states", no_teacher)
    _step_grads(_model(), batch, TrainConfig(loss="sft", micro_batch_tokens=400))
    with pytest.raises(AssertionError, match="teacher pass"):
        _step_grads(_model(), batch, TrainConfig(micro_batch_tokens=400))


@torch.no_grad()
def _reference_signal(model, e: EncodedInteraction, config: TrainConfig) -> torch.Tensor:
    """Per-completion-token advantage log q - log pi before any clip (sdpo) or NLL (sft), from plain full-logit
    forwards."""
    def logprobs(ids, temperature):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(e.completion_ids) - 1:-1] / temperature
        return logits.log_softmax(-1).gather(-1, torch.tensor(e.completion_ids)[:, None]).squeeze(-1)

    if config.loss == "sft":
        return -logprobs(e.student_input_ids, 1.0)
    return logprobs(e.teacher_input_ids, config.temperature) - logprobs(e.student_input_ids, config.temperature)


def test_accumulation_over_micro_batches_equals_one_batch(batch):
    config = TrainConfig(micro_batch_tokens=64, optimizer="sgd", lr=0.5, max_grad_norm=None)
    whole = TrainConfig(micro_batch_tokens=1_000_000, optimizer="sgd", lr=0.5, max_grad_norm=None)
    models = [_model(), _model()]
    for model, cfg in zip(models, (config, whole)):
        optimizer = _optimizer(model, cfg)
        scheduler = _scheduler(optimizer, cfg.__class__(warmup_ratio=0.0, schedule="constant"), 10)
        train_step(model, batch, objective_of(cfg), optimizer, scheduler, step_options(cfg))
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=0, msg=name)
    assert not torch.equal(models[0].lm_head.weight, _model().lm_head.weight)


@pytest.mark.parametrize("lora,optimizer,lr,max_grad_norm", [
    (False, "adamw", 1e-3, 1.0), (False, "sgd", 0.5, None), (True, "adamw", 1e-3, 1.0), (True, "sgd", 0.5, None)],
    ids=["full-adamw-clip", "full-sgd", "lora-adamw-clip", "lora-sgd"])
def test_optimizer_step_equals_reference_step(batch, lora, optimizer, lr, max_grad_norm):
    config = TrainConfig(optimizer=optimizer, lr=lr, max_grad_norm=max_grad_norm, warmup_ratio=0.0,
                         micro_batch_tokens=300, weight_decay=0.01)
    model = _model(lora)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = []
    for m in (model, ref):
        opt = _optimizer(m, config)
        for group in opt.param_groups:
            # Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 it is a sign function that
            # flips on fp32 rounding of near-zero gradients; eps=1e-4 keeps it smooth so the comparison is fair.
            if "eps" in group:
                group["eps"] = 1e-4
        runs.append((m, opt, _scheduler(opt, config, total_steps=4)))
    train_step(model, batch, objective_of(config), *runs[0][1:], step_options(config))
    reference_step(*runs[1], batch, max_grad_norm=config.max_grad_norm)
    moved = 0
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6 * max(lr / 1e-3, 1), rtol=0, msg=name)
        moved += int(not torch.equal(a, before[name]))
    assert moved == sum(p.requires_grad for p in model.parameters())
    if lora:
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_interaction_weights():
    assert interaction_weights([4, 0, 2], "sequence") == pytest.approx([1 / 12, 0.0, 1 / 6])
    assert interaction_weights([4, 0, 2], "token") == pytest.approx([1 / 6, 0.0, 1 / 6])


def test_sft_loss_matches_cross_entropy_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = -100
    w = torch.rand(37, generator=g)
    monkeypatch.setattr(sft_module, "_SFT_CHUNK_BYTES", 4 * 50 * 6)  # 6-token chunks
    loss, nll = sft_loss(hidden, weight, targets, w)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    keep = targets != -100
    expected_nll = -torch.log_softmax(h2 @ w2.T, -1)[keep].gather(1, targets[keep, None]).squeeze(1)
    expected = (w[keep] * expected_nll).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll[keep], expected_nll.detach())
    assert not nll[~keep].any()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_an_optimizer_with_one_backward_per_step_refuses_several_micro_batches(model_dir):
    """torchao's gradient-offloading optimizer keeps only the last backward's gradient: a step that packs into
    several micro-batches is refused before any pass."""
    from transformers import AutoModelForCausalLM

    from sdpo_fast.loss import make_objective
    from sdpo_fast.train.step import StepOptions, train_step

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.one_backward_per_step = True
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batch = [EncodedInteraction([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [4, 5], 3) for _ in range(2)]
    with pytest.raises(ValueError, match="offload_optimizer keeps one micro-batch"):
        train_step(model, batch, make_objective("sdpo"), optimizer, scheduler, StepOptions(micro_batch_tokens=6))
    train_step(model, batch, make_objective("sdpo"), optimizer, scheduler, StepOptions(micro_batch_tokens=64))
