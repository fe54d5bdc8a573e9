"""sdpo_loss value policy: non-finite inputs (check_finite), temperature lower bound, token_weights >= 0,
teacher_logprobs <= 0, and no loss tokens -> loss 0 with zero gradients on every backend."""
from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast import sdpo_loss
from sdpo_fast.loss.backends import triton_available

BACKENDS = ["torch", "reference"] + (["triton"] if triton_available() else [])


def _inputs(n=6, d=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    th = torch.randn(n, d, generator=g)
    return h, w, t, th


@pytest.mark.parametrize("name", ["student_hidden", "lm_head_weight", "teacher_hidden", "teacher_lm_head_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_tensor_is_named(name, value):
    h, w, t, th = _inputs()
    tensors = {"student_hidden": h, "lm_head_weight": w, "teacher_hidden": th, "teacher_lm_head_weight": w.clone()}
    tensors[name].view(-1)[3] = value
    with pytest.raises(ValueError, match=f"^{name} has non-finite values"):
        sdpo_loss(tensors["student_hidden"], tensors["lm_head_weight"], t, teacher_hidden=tensors["teacher_hidden"],
                  teacher_lm_head_weight=tensors["teacher_lm_head_weight"], backend="torch")


def test_check_finite_false_skips_the_pass():
    h, w, t, th = _inputs()
    h[0, 0] = math.nan
    loss = sdpo_loss(h, w, t, teacher_hidden=th, backend="torch", check_finite=False)
    assert torch.isnan(loss)


def test_per_token_inputs_are_checked_at_loss_positions_only():
    h, w, t, _ = _inputs()
    t[0] = -100
    lq = torch.log_softmax(torch.randn(6, 11), -1)[:, 0]
    lq[0] = math.nan  # ignored position
    weights = torch.full((6,), 0.2)
    weights[0] = -5.0  # ignored position
    sdpo_loss(h, w, t, teacher_logprobs=lq, token_weights=weights, backend="torch")
    lq[1] = math.inf
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sdpo_loss(h, w, t, teacher_logprobs=lq, backend="torch")


def test_sign_constraints():
    h, w, t, th = _inputs()
    weights = torch.full((6,), 0.1)
    weights[2] = -0.1
    with pytest.raises(ValueError, match="token_weights must be >= 0"):
        sdpo_loss(h, w, t, teacher_hidden=th, token_weights=weights, backend="torch")
    lq = torch.full((6,), -1.0)
    lq[4] = 0.5
    with pytest.raises(ValueError, match="teacher_logprobs must be <= 0"):
        sdpo_loss(h, w, t, teacher_logprobs=lq, backend="torch")
    lq[4] = 1e-5  # rounding of a low-precision log-softmax
    sdpo_loss(h, w, t, teacher_logprobs=lq, backend="torch")


@pytest.mark.parametrize("temperature", [1e-30, 1e-4])
def test_temperature_lower_bound(temperature):
    h, w, t, th = _inputs()
    with pytest.raises(ValueError, match="temperature must be >= 0.001"):
        sdpo_loss(h, w, t, teacher_hidden=th, temperature=temperature, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty", "all-ignored", "all-ignored-centred"])
def test_no_loss_tokens_is_zero_with_zero_grads(backend, case):
    h, w, t, th = _inputs(n=0 if case == "empty" else 4)
    t.fill_(-100)
    h.requires_grad_(True)
    w.requires_grad_(True)
    extra = {}
    if case == "all-ignored-centred":
        extra = dict(center_advantages=True, sequence_index=torch.zeros(4, dtype=torch.long))
    loss, stats = sdpo_loss(h, w, t, teacher_hidden=th, backend=backend, return_stats=True, **extra)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == 0.0 and math.copysign(1.0, loss.item()) == 1.0
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(h.grad, torch.zeros_like(h))
    assert stats.advantages.shape == t.shape and not stats.advantages.any()
