"""sdpo_loss refuses what it cannot compute as asked: a top-1 support without the tail (trains nothing), token
weights that require a gradient (the fused backends treat them as constants), importance_clip without the
sampler's log-probs, and non-finite behavior_logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast import sdpo_loss
from sdpo_fast.online.config import OnlineConfig
from sdpo_fast.train import resolve_config


def _inputs(n=6, d=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randint(0, v, (n,), generator=g),
            torch.randn(n, d, generator=g))


def test_top1_without_tail_trains_nothing_and_is_refused_everywhere():
    h, w, t, th = _inputs()
    # Why: the student's top-1 token renormalized over its one-token support has probability 1 for both models.
    top = (h @ w.T).argmax(-1, keepdim=True)
    for logits in (h @ w.T, th @ w.T):
        p = torch.softmax(logits.double().gather(-1, top), -1)
        assert torch.equal(p, torch.ones_like(p))
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match="distillation_topk=1 with distillation_add_tail=False trains nothing"):
            sdpo_loss(h, w, t, teacher_hidden=th, distillation_mode="topk_logits", distillation_topk=1,
                      distillation_add_tail=False, backend=backend)
    options = dict(distillation_mode="topk_logits", distillation_topk=1, distillation_add_tail=False)
    with pytest.raises(ValueError, match="trains nothing"):
        resolve_config(options)
    with pytest.raises(ValueError, match="trains nothing"):
        OnlineConfig(**options).validate()
    for ok in (dict(options, distillation_add_tail=True), dict(options, distillation_topk=2)):
        resolve_config(ok)
        loss = sdpo_loss(h, w, t, teacher_hidden=th, backend="torch", **ok)
        assert loss.item() != 0


def test_token_weights_that_require_grad_are_refused():
    h, w, t, th = _inputs()
    weights = torch.rand(6, requires_grad=True)
    with pytest.raises(ValueError, match="token_weights requires grad.*token_weights.detach"):
        sdpo_loss(h, w, t, teacher_hidden=th, token_weights=weights, backend="torch")
    with torch.no_grad():  # no gradient asked for: nothing is lost
        sdpo_loss(h, w, t, teacher_hidden=th, token_weights=weights, backend="torch")
    # detached: the loss is sum_t w_t * D_t, D_t = -A_t log pi(y_t) with A_t the clipped log-ratio (plain fp64)
    lp = torch.log_softmax((h @ w.T).double(), -1).gather(-1, t[:, None])[:, 0]
    lq = torch.log_softmax((th @ w.T).double(), -1).gather(-1, t[:, None])[:, 0]
    expected = (weights.detach().double() * -(lq - lp) * lp).sum()
    got = sdpo_loss(h, w, t, teacher_hidden=th, token_weights=weights.detach(), backend="torch")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_importance_clip_without_behavior_logprobs_is_refused():
    h, w, t, th = _inputs()
    with pytest.raises(ValueError, match="importance_clip=2.0 needs behavior_logprobs"):
        sdpo_loss(h, w, t, teacher_hidden=th, importance_clip=2.0, backend="torch")


@pytest.mark.parametrize("value", [math.nan, -math.inf, math.inf])
def test_behavior_logprobs_are_checked_like_every_sampler_float(value):
    h, w, t, th = _inputs()
    behavior = torch.full((6,), -1.0)
    behavior[2] = value
    with pytest.raises(ValueError, match="behavior_logprobs has non-finite values"):
        sdpo_loss(h, w, t, teacher_hidden=th, behavior_logprobs=behavior, importance_clip=2.0, backend="torch")
    t[2] = -100  # at an ignored position the value is not read
    loss = sdpo_loss(h, w, t, teacher_hidden=th, behavior_logprobs=behavior, importance_clip=2.0, backend="torch")
    assert math.isfinite(loss.item())


def test_ignoring_every_completion_token_trains_nothing_and_is_refused():
    with pytest.raises(ValueError, match="ignore_first_k 8 >= max_completion_tokens 8 trains nothing"):
        resolve_config({"ignore_first_k": 8, "max_completion_tokens": 8})
    resolve_config({"ignore_first_k": 7, "max_completion_tokens": 8})  # one loss token left
    with pytest.raises(ValueError, match="ignore_first_k 7 > max_new_tokens 6 trains nothing"):
        OnlineConfig(ignore_first_k=7, max_new_tokens=6).validate()
    OnlineConfig(ignore_first_k=6, max_new_tokens=6).validate()  # a reply observed as text keeps its end of turn
