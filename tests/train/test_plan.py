"""`plan_memory` arithmetic against the Qwen3-8B anchors and against tensors measured on tiny models."""
from __future__ import annotations

import torch

from sdpo_fast import cli
from sdpo_fast.testing import tiny_causal_lm
from sdpo_fast.train.plan import load_config, plan_memory


def _tiny(**options):
    return tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300, **options)


def test_qwen3_8b_anchors():
    plan = plan_memory(load_config("qwen3-8b"), prompt_tokens=1000, completion_tokens=24)
    assert 8.18e9 < plan.parameters < 8.20e9
    assert plan.prefix_kv == 1000 * 144 * 1024  # 144 KiB of bf16 K/V per prefix token
    assert plan.weights == plan.parameters * 2


def test_parameter_and_lora_counts_match_real_models():
    model = _tiny()
    plan = plan_memory(model.config, dtype=torch.float32)
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    assert plan.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        peft_model = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=targets[0] if len(targets) == 1
                                                         else targets))
        expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert plan_memory(model.config, lora_r=4, lora_target_modules=targets).trainable == expected


def test_gradient_and_optimizer_bytes_match_a_real_step():
    model = _tiny().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 300, (1, 16))).logits.float().sum().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optimizer.step()
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    plan = plan_memory(model.config, dtype=torch.float32, optimizer="adamw")
    assert plan.gradients == grads and plan.optimizer == states
    assert plan_memory(model.config, dtype=torch.float32, optimizer="sgd").optimizer == 0


def test_checkpointed_activations_cover_the_measured_checkpoints():
    """With gradient checkpointing the forward keeps about (layers + 1) * d + 2 * head_dim values per token."""
    model = _tiny().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved = {}

    def keep(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    tokens = 128
    params = {p.data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=torch.randint(0, 300, (1, tokens)))
    measured = sum(v for (ptr, *_), v in saved.items() if ptr not in params)
    checkpoints = tokens * ((3 + 1) * 64 + 2 * 16) * 4
    assert 0.9 * checkpoints <= measured <= 1.2 * checkpoints
    plan = plan_memory(model.config, dtype=torch.float32, micro_batch_tokens=tokens, completion_tokens=tokens)
    assert plan.activations >= measured
    assert plan_memory(model.config, dtype=torch.float32, micro_batch_tokens=tokens, completion_tokens=tokens,
                       gradient_checkpointing=False).activations > plan.activations


def test_plan_command(capsys, tmp_path):
    assert cli.main(["plan", "--model", "qwen3-8b", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    assert "parameters 8.191B, trainable 43.65M" in out and "fits in 24 GiB" in out
    assert cli.main(["plan", "--model", "qwen3-8b", "--optimizer", "adamw"]) == 0
    assert "does NOT fit in 24 GiB" in capsys.readouterr().out
    assert cli.main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "no model config" in capsys.readouterr().err
