"""ema and base teachers (train/teachers.py) against plain PyTorch: the EMA update, and the step's gradients with
the teacher's log-probs from a plain full-logits forward of a model holding the teacher's weights."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import CaptureGrads

from sdpo_fast.data import encode_interactions, load_interactions, sample_path
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from sdpo_fast.train import TrainConfig, objective_of, step_options, train_step
from sdpo_fast.train.reference_step import _completion_logprobs
from sdpo_fast.train.teachers import Teacher


@pytest.fixture(scope="module")
def batch():
    items, _ = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:3])
    return items


def _model(lora: bool):
    model = tiny_causal_lm("qwen3", initializer_range=0.2, seed=1).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _step(model, batch, teacher, optimizer):
    config = TrainConfig(ignore_first_k=0, loss_backend="torch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    options = dataclasses.replace(step_options(config), max_grad_norm=None, attn_backend="sdpa")
    return train_step(model, batch, objective_of(config), optimizer, scheduler, options, teacher=teacher)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _plain_grads(model, teacher_model, batch, base_adapter_off: bool):
    """Per-sequence-mean SDPO loss from full logits, log q from teacher_model (its adapter disabled if asked)."""
    model.zero_grad()
    total = 0.0
    for e in batch:
        n = len(e.completion_ids)
        logp = _completion_logprobs(model, e.student_input_ids, n, 1.0)
        with torch.no_grad():
            if base_adapter_off:
                with teacher_model.disable_adapter():
                    logq = _completion_logprobs(teacher_model, e.teacher_input_ids, n, 1.0)
            else:
                logq = _completion_logprobs(teacher_model, e.teacher_input_ids, n, 1.0)
        total = total + (-(logq - logp.detach()) * logp).mean() / len(batch)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", ["ema", "base"])
def test_teacher_step_matches_plain_pytorch(kind, lora, batch):
    rate = 0.3
    model = _model(lora)
    initial = copy.deepcopy(model)
    teacher = Teacher(model, kind, ema_rate=rate)
    before = _trainable(model)
    _step(model, batch, teacher, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5))
    after = _trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    if kind == "ema":  # theta_T = (1 - rate) theta_0 + rate theta_1 after the first step
        state = teacher.state_dict()
        assert set(after) <= set(state)
        for name in after:
            want = (1 - rate) * before[name] + rate * after[name]
            torch.testing.assert_close(state[name], want, rtol=1e-6, atol=1e-7)
    # the teacher of the second step, as a plain model
    reference_teacher = copy.deepcopy(initial)
    if kind == "ema":
        with torch.no_grad():
            params = dict(reference_teacher.named_parameters())
            for name, value in teacher.state_dict().items():
                params[name].copy_(value)
    optimizer = CaptureGrads(p for p in model.parameters() if p.requires_grad)
    _step(model, batch, teacher, optimizer)
    assert _trainable(model).keys() == after.keys()
    for name, value in _trainable(model).items():
        assert torch.equal(value, after[name]), "the teacher pass changed the student's weights"
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[i]: g for i, g in optimizer.grads.items()}
    want = _plain_grads(model, reference_teacher, batch, base_adapter_off=kind == "base" and lora)
    for name, grad in want.items():
        scale = grad.abs().max().item()
        assert (got[name] - grad).abs().max().item() <= 1e-4 * max(scale, 1e-8), name


def test_state_dict_round_trip_is_bitwise(batch):
    model = _model(lora=True)
    teacher = Teacher(model, "ema", ema_rate=0.05)
    _step(model, batch, teacher, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5))
    fresh = Teacher(model, "ema", ema_rate=0.05)
    fresh.load_state_dict(teacher.state_dict())
    assert all(torch.equal(a, teacher.state_dict()[n]) for n, a in fresh.state_dict().items())
    with pytest.raises(ValueError, match="teacher"):
        Teacher(model, "frozen")
    with pytest.raises(ValueError, match="teacher_ema_rate"):
        Teacher(model, "ema", ema_rate=1.5)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:4]))
    return str(path)


def _safetensors(directory):
    from safetensors.torch import load_file

    return {f"{p.name}:{k}": v for p in sorted(directory.glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.parametrize("options", [dict(lora_r=4, teacher="ema"), dict(teacher="ema"),
                                     dict(teacher="base", distillation_mode="topk_logits", distillation_topk=5,
                                          distillation_alpha=0.5)],
                         ids=["lora-ema", "full-ema", "full-base-topk"])
def test_resume_with_a_teacher_equals_uninterrupted(tmp_path, model_dir, data_path, options):
    """Checkpoints carry the teacher's own weights (teacher.safetensors); a resumed run is bitwise the same."""
    from pathlib import Path

    from sdpo_fast.train import train

    base = dict(model=model_dir, data=data_path, batch_size=2, epochs=2, lr=0.1, optimizer="sgd",
                micro_batch_tokens=256, save_steps=2, seed=7, teacher_ema_rate=0.3, **options)
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **base).validate(), progress=False)
    train(TrainConfig(output_dir=str(tmp_path / "split"), **base).validate(), progress=False, stop_after=3)
    resumed = train(TrainConfig(output_dir=str(tmp_path / "split"), resume=True, **base).validate(), progress=False)
    assert whole["steps"] == resumed["steps"] == 4
    want, got = _safetensors(Path(whole["checkpoint"])), _safetensors(Path(resumed["checkpoint"]))
    assert any(k.startswith("teacher.safetensors:") for k in want)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _bf16_model(lora: bool):
    model = _model(lora)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_ema_is_stepped_in_fp32_like_its_formula(lora, batch):
    """bf16 weights through fp32 masters: after each step the EMA equals theta_T + rate * (theta_S - theta_T)
    applied in fp32 to the student's exact (master) weights, from their start; the teacher pass reads its
    rounding. A bf16 lerp would round most of each rate * (theta_S - theta_T) step away."""
    from sdpo_fast.train import build_optimizer

    rate, steps = 0.05, 4
    model = _bf16_model(lora)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-3, 0.0)
    masters = optimizer.param_groups[0]["params"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    teacher = Teacher(model, "ema", ema_rate=rate)
    want = {n: m.detach().clone() for n, m in zip(names, masters)}
    start = {n: t.clone() for n, t in want.items()}
    student_bf16 = {n: t.to(torch.bfloat16).float() for n, t in want.items()}
    for _ in range(steps):
        _step(model, batch, teacher, optimizer)
        for n, m in zip(names, masters):
            want[n] = want[n] + rate * (m.detach() - want[n])
            student_bf16[n] = student_bf16[n] + rate * (dict(model.named_parameters())[n].detach().float()
                                                        - student_bf16[n])
    state = teacher.state_dict()
    assert all(state[n].dtype == torch.float32 for n in names)
    for n in names:
        torch.testing.assert_close(state[n], want[n], rtol=1e-6, atol=1e-8)
    moved = sum((state[n] - start[n]).square().sum() for n in names).sqrt()
    formula_on_bf16 = sum((student_bf16[n] - start[n]).square().sum() for n in names).sqrt()
    assert abs(moved / formula_on_bf16 - 1) < 0.05  # the formula on the saved bf16 student weights moves as far
    if not lora:  # the copy the teacher pass reads is the EMA's rounding
        copy_params = dict(teacher.copy.named_parameters())
        assert all(copy_params[n].dtype == torch.bfloat16 and torch.equal(copy_params[n], state[n].to(torch.bfloat16))
                   for n in names)
    fresh = Teacher(model, "ema", ema_rate=rate)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[n], state[n]) for n in names)
    if not lora:
        assert all(torch.equal(a, b) for a, b in zip(fresh.copy.parameters(), teacher.copy.parameters()))


def _one_process_group(device: str) -> None:
    store = torch.distributed.HashStore()
    if device == "cuda":
        torch.distributed.init_process_group("nccl", rank=0, world_size=1, store=store,
                                             device_id=torch.device("cuda", 0))
    else:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_ema_swap_runs_outside_every_fsdp2_forward(device, batch, monkeypatch):
    """FSDP2 (one process) + LoRA + ema teacher: every in-place swap of the EMA into the adapter, and back, runs
    while no FSDP2 root forward is open (the root's pre-forward then orders its all-gather streams after the
    copies), and the sharded step equals the unsharded one. On a GPU the equality decides the stream race."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    from sdpo_fast.train.distributed import shard_model

    def prepared(sharded: bool):
        torch.manual_seed(0)  # peft draws lora_A from the global RNG
        model = _model(lora=True).to(device)
        runner = shard_model(model) if sharded else model
        teacher = Teacher(model, "ema", ema_rate=0.3)
        for value in teacher.ema.values():  # a teacher whose adapter differs from the student's
            value.mul_(1.5).add_(0.01)
        return runner, model, teacher

    def step(runner, model, teacher):
        config = TrainConfig(ignore_first_k=0, loss_backend="torch")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        options = dataclasses.replace(step_options(config), max_grad_norm=None, micro_batch_tokens=1,
                                      attn_backend="sdpa")
        train_step(runner, batch, objective_of(config), optimizer, scheduler, options, teacher=teacher)

    runner, model, teacher = prepared(sharded=False)
    step(runner, model, teacher)
    want = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    _one_process_group(device)
    try:
        root, model, teacher = prepared(sharded=True)
        state = root._get_fsdp_state()
        seen, real_swap = [], Teacher._swap

        def swap(self, values):
            seen.append(state._state_ctx.iter_forward_root is None)
            return real_swap(self, values)

        roots = []
        root.register_forward_pre_hook(lambda module, args: roots.append(args[0].__name__))
        monkeypatch.setattr(Teacher, "_swap", swap)
        step(root, model, teacher)
        got = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        torch.distributed.destroy_process_group()
    assert len(seen) == 2 * len(batch) and all(seen), "an EMA swap ran inside an FSDP2 root forward"
    assert roots == ["_teacher_pass", "micro_batch_output"] * len(batch)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
