"""Online teachers (base, ema) and distillation modes against plain PyTorch: the teacher's logits from a plain HF
forward (adapter disabled, or a model copy holding a hand-computed EMA of the policy's own adapter), the loss
formed by hand, and one SGD step at lr 1 (the weight change is minus the gradient)."""
from __future__ import annotations

import copy

import pytest
import torch

from sdpo_fast.data.interactions import Interaction
from sdpo_fast.data.prompts import encode_interaction
from sdpo_fast.loss.reference import reference_divergence
from sdpo_fast.online import loop
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config, resolve_online_config
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

INTERACTIONS = [
    Interaction([{"role": "user", "content": "How do I boil an egg?"}],
                "Sure! Step 1: preheat the oven. Step 2: mix the flour.", "Too long. Keep it short."),
    Interaction([{"role": "user", "content": "What is the capital of Australia?"}],
                "The capital of Australia is Sydney.", "That is not correct, it is Canberra."),
]
IGNORE_FIRST_K = 1


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("qwen3")


def _two_adapter_model():
    """A peft model with adapters "first" and "second", both with nonzero random lora_B (each changes the outputs)."""
    from peft import get_peft_model

    config = OnlineConfig(lora_r=4, lora_alpha=8)
    model = get_peft_model(tiny_causal_lm("qwen3", initializer_range=0.2).train(), lora_config(config),
                           adapter_name="first")
    model.add_adapter("second", lora_config(config))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    return model


def _adapter(model, name):
    return {n: p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n}


def _policy(model, tokenizer, adapter, **options):
    config = OnlineConfig(**{"ignore_first_k": IGNORE_FIRST_K, "lora_r": 4, "lora_alpha": 8, "lr": 1.0,
                             "loss_backend": "torch", "update_every": len(INTERACTIONS), **options})
    policy = OnlinePolicy(model, tokenizer, config, adapter_name=adapter)
    policy.optimizer = torch.optim.SGD(policy.parameters, lr=1.0)
    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda _: 1.0)
    return policy


def _update(policy):
    policy.pending = [loop.PendingInteraction(i, None) for i in INTERACTIONS]
    return policy.update()


def _logprob_rows(logits, n):
    """log_softmax over the vocabulary of the n positions predicting the completion, fp32 (n, V)."""
    return torch.log_softmax(logits[0, -n - 1:-1].float(), -1)


def _plain_grads(model, adapter, teacher_logits, encoded, *, mode="sampled_token", alpha=1.0, clip=None,
                 center=False, **divergence):
    """Adapter `adapter`'s gradients of the per-sequence-mean loss, then batch mean: sampled_token
    -A_t log pi(y_t) with A_t = log q - log pi (centred, clipped), or a logit mode's divergence D_t."""
    model.set_adapter(adapter)
    params = _adapter(model, adapter)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for e in encoded:
        n = len(e.completion_ids)
        targets = torch.tensor(e.completion_ids)[:, None]
        student = _logprob_rows(model(input_ids=torch.tensor([e.student_input_ids])).logits, n)
        with torch.no_grad():
            teacher = _logprob_rows(teacher_logits(torch.tensor([e.teacher_input_ids])), n)
        student, teacher = student[IGNORE_FIRST_K:], teacher[IGNORE_FIRST_K:]
        if mode == "sampled_token":
            kept = targets[IGNORE_FIRST_K:]
            lp, lq = student.gather(-1, kept)[:, 0], teacher.gather(-1, kept)[:, 0]
            advantage = (lq - lp).detach()
            if center:
                advantage = advantage - advantage.mean()
            if clip is not None:
                advantage = advantage.clamp(-clip, clip)
            per_token = -advantage * lp
        else:
            per_token = reference_divergence(student, teacher, mode=mode, alpha=alpha, **divergence)
        total = total + per_token.mean() / len(encoded)
    total.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)  # the update accumulates into .grad
    return grads


def _assert_step(before, after, grads):
    assert grads.keys() == after.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(before[name] - after[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


def test_base_teacher_is_the_policys_adapter_disabled(tokenizer):
    model = _two_adapter_model()
    policy = _policy(model, tokenizer, "second", teacher="base", signal_clip=0.5)
    encoded = [encode_interaction(tokenizer, i) for i in INTERACTIONS]

    def base_logits(ids):
        with model.disable_adapter():
            return model(input_ids=ids).logits

    want = _plain_grads(model, "second", base_logits, encoded, clip=0.5, center=True)
    model.set_adapter("first")  # the update switches to its own adapter
    other, frozen = _snapshot(_adapter(model, "first")), _snapshot({n: p for n, p in model.named_parameters()
                                                                 if "lora_" not in n})
    before = _snapshot(_adapter(model, "second"))
    stats = _update(policy)
    assert stats["interactions"] == 2 and "mean_advantage" in stats
    _assert_step(before, _snapshot(_adapter(model, "second")), want)
    for name, value in {**other, **frozen}.items():
        assert torch.equal(value, dict(model.named_parameters())[name]), name
    # the base teacher differs from the live one here: the live teacher's gradients are not these
    live = _plain_grads(model, "second", lambda ids: model(input_ids=ids).logits, encoded, clip=0.5, center=True)
    assert any((live[n] - want[n]).abs().max() > 1e-3 * want[n].abs().max() for n in want)


def test_ema_teacher_tracks_only_its_own_adapter(tokenizer):
    rate, updates = 0.3, 3
    model = _two_adapter_model()
    mine = _policy(model, tokenizer, "second", teacher="ema", teacher_ema_rate=rate)
    other = _policy(model, tokenizer, "first", teacher="ema", teacher_ema_rate=rate)
    encoded = [encode_interaction(tokenizer, i) for i in INTERACTIONS]
    ema = _snapshot(_adapter(model, "second"))
    assert mine.teacher.state_dict().keys() == ema.keys()
    for k in range(updates):
        if k == updates - 1:  # the last update's gradients, with the teacher as a plain model holding the EMA
            teacher_model = copy.deepcopy(model)
            with torch.no_grad():
                for name, value in ema.items():
                    dict(teacher_model.named_parameters())[name].copy_(value)
            teacher_model.set_adapter("second")
            want = _plain_grads(model, "second", lambda ids: teacher_model(input_ids=ids).logits, encoded,
                                clip=2.0, center=True)
            before = _snapshot(_adapter(model, "second"))
        _update(other)
        _update(mine)
        weights = _snapshot(_adapter(model, "second"))
        ema = {n: e + rate * (weights[n] - e) for n, e in ema.items()}
    _assert_step(before, weights, want)
    state = mine.teacher.state_dict()
    for name, value in ema.items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert other.teacher.state_dict().keys() == _adapter(model, "first").keys()


@pytest.mark.parametrize("mode, alpha, options", [("full_logits", 0.5, {}),
                                                  ("topk_logits", 0.5, dict(topk=5, add_tail=True)),
                                                  ("topk_logits", 0.0, dict(topk=5, add_tail=False))])
def test_logit_mode_update_matches_materialized_logits(tokenizer, mode, alpha, options):
    model = _two_adapter_model()
    config_options = dict(distillation_topk=options["topk"], distillation_add_tail=options["add_tail"]) \
        if options else {}
    policy = _policy(model, tokenizer, "first", distillation_mode=mode, distillation_alpha=alpha, **config_options)
    assert policy.config.resolved_signal_clip is None and not policy.config.resolved_center_advantages
    encoded = [encode_interaction(tokenizer, i) for i in INTERACTIONS]
    want = _plain_grads(model, "first", lambda ids: model(input_ids=ids).logits, encoded, mode=mode, alpha=alpha,
                        **options)
    before = _snapshot(_adapter(model, "first"))
    stats = _update(policy)
    assert stats["mean_divergence"] >= 0
    _assert_step(before, _snapshot(_adapter(model, "first")), want)


def test_user_adapters_keep_the_ema_teacher_across_unloads(tokenizer, tmp_path):
    from sdpo_fast.online.adapters import UserAdapters

    config = OnlineConfig(update_every=1, max_new_tokens=6, lora_r=4, lora_alpha=8, lr=1e-2, teacher="ema",
                          teacher_ema_rate=0.5)
    history = [{"role": "user", "content": "How do I boil an egg?"}]
    learned = history + [{"role": "assistant", "content": "Boil it."}, {"role": "user", "content": "Shorter."}]
    states = []
    for bound in (1, 2):
        adapters = UserAdapters(tiny_causal_lm("qwen3", initializer_range=0.2), tokenizer, tmp_path / str(bound),
                                config, max_loaded_users=bound)
        for user_id in ("alice", "bob", "alice"):
            adapters.learn(user_id, learned)
        states.append(adapters.policy("alice").teacher.state_dict())
    assert states[0].keys() == states[1].keys() and all(".alice." in n for n in states[0])
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


@pytest.mark.parametrize("options, message", [
    (dict(teacher="frozen"), "teacher must be one of"),
    (dict(teacher="ema", teacher_ema_rate=1.5), "teacher_ema_rate must be at most 1"),
    (dict(distillation_mode="kl"), "distillation_mode must be one of"),
    (dict(distillation_alpha=0.5), "distillation_alpha must be 1 with distillation_mode sampled_token"),
    (dict(distillation_mode="topk_logits", distillation_topk=0), "distillation_topk must be an integer"),
    (dict(distillation_mode="full_logits", signal_clip=2.0), "signal_clip applies to distillation_mode"),
    (dict(distillation_mode="full_logits", center_advantages=True), "center_advantages applies to"),
    (dict(distillation_add_tail="yes"), "distillation_add_tail must be true or false"),
    (dict(signal_clip="off"), "signal_clip must be 'auto', None"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        OnlineConfig(**options).validate()


def test_defaults_resolve_per_mode_and_the_preset_is_unchanged():
    paper = OnlineConfig.from_preset("paper-personalization")
    assert (paper.resolved_signal_clip, paper.resolved_center_advantages, paper.update_every, paper.lr) == \
        (2.0, True, 16, 5e-6)
    logits = OnlineConfig.from_preset("paper-personalization", distillation_mode="full_logits", center_advantages=False,
                                      signal_clip=None)
    assert (logits.resolved_signal_clip, logits.resolved_center_advantages) == (None, False)
    assert OnlineConfig(signal_clip=0.5, center_advantages=False).resolved_signal_clip == 0.5


def test_resolve_precedence_and_unknown_keys():
    config = resolve_online_config({"lr": "1e-3", "update_every": 3, "teacher": "ema"}, {"update_every": 5},
                                   preset="paper-personalization", defaults={"lr": 1.0, "lora_r": 8, "seed": 4})
    assert (config.lr, config.update_every, config.teacher, config.lora_r, config.seed) == (1e-3, 5, "ema", 64, 4)
    with pytest.raises(ValueError, match=r"unknown config file key\(s\) \['lr_rate'\]; valid keys: update_every"):
        resolve_online_config({"lr_rate": 1.0})
