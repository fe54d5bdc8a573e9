"""Online SDPO core: centred-advantage gradients, the loop, per-user adapters."""
from __future__ import annotations

import hashlib

import pytest
import torch

from sdpo_fast.data.interactions import Interaction
from sdpo_fast.data.prompts import encode_interaction
from sdpo_fast.online.adapters import UserAdapters, check_user_id
from sdpo_fast.online.loop import (OnlineConfig, OnlinePolicy, accumulate_online_gradients, lora_config,
                                   run_online)
from sdpo_fast.online.personas import get_persona
from sdpo_fast.online.users import RuleUser
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

INTERACTIONS = [
    Interaction([{"role": "user", "content": "How do I boil an egg?"}],
                "Sure! Step 1: preheat the oven. Step 2: mix the flour.", "Too long. Keep it short."),
    Interaction([{"role": "user", "content": "What is the capital of Australia?"}],
                "The capital of Australia is Sydney.", "That is not correct, it is Canberra."),
    Interaction([{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Write it like a pirate."}],
                "Arrr, the quick brown fox jumps over the lazy dog.", "Thanks!"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("qwen3")


def _model():
    return tiny_causal_lm("qwen3", initializer_range=0.2).train()


def _independent_grads(model, encoded, ignore_first_k, clip, center):
    """Plain PyTorch: full logits per sequence, per-sequence mean-centred clipped advantages."""
    model.zero_grad()
    total = 0.0
    for e in encoded:
        n = len(e.completion_ids)
        targets = torch.tensor(e.completion_ids)
        student = model(input_ids=torch.tensor([e.student_input_ids])).logits[0, -n - 1:-1]
        lp = torch.log_softmax(student.float(), -1).gather(-1, targets[:, None])[:, 0]
        with torch.no_grad():
            teacher = model(input_ids=torch.tensor([e.teacher_input_ids])).logits[0, -n - 1:-1]
            lq = torch.log_softmax(teacher.float(), -1).gather(-1, targets[:, None])[:, 0]
        lp, lq = lp[ignore_first_k:], lq[ignore_first_k:]
        adv = (lq - lp).detach()
        if center:
            adv = adv - adv.mean()
        adv = adv.clamp(-clip, clip)
        total = total + -(adv * lp).mean() / len(encoded)
    total.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("center", [True, False])
def test_centred_advantage_gradient_matches_plain_pytorch(tokenizer, center):
    encoded = [encode_interaction(tokenizer, i) for i in INTERACTIONS]
    model = _model()
    expected = _independent_grads(model, encoded, ignore_first_k=1, clip=0.5, center=center)
    model.zero_grad()
    config = OnlineConfig(ignore_first_k=1, signal_clip=0.5, center_advantages=center, lora_r=0,
                          loss_backend="torch")
    accumulate_online_gradients(model, encoded, config)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_centring_changes_the_gradient(tokenizer):
    encoded = [encode_interaction(tokenizer, i) for i in INTERACTIONS]
    model = _model()
    centred = _independent_grads(model, encoded, 0, 100.0, True)
    plain = _independent_grads(model, encoded, 0, 100.0, False)
    assert not torch.allclose(centred["lm_head.weight"], plain["lm_head.weight"])


def _peft_policy(tokenizer, **options):
    from peft import get_peft_model

    config = OnlineConfig(**{"update_every": 2, "max_new_tokens": 8, "lora_r": 4, "lora_alpha": 8, "lr": 1e-2,
                             **options}).validate()
    return OnlinePolicy(get_peft_model(_model(), lora_config(config)), tokenizer, config)


def test_loop_runs_and_updates_only_the_adapter(tokenizer):
    policy = _peft_policy(tokenizer)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    user = RuleUser(get_persona("concise-casual-beginner"))
    records = run_online(policy, user, ["How do I boil an egg?", "What is gravity?"], 4)
    assert [r["interaction"] for r in records] == [1, 2, 3, 4]
    updates = [r["update"] for r in records if r["update"]]
    assert len(updates) == 2 and all(u["interactions"] == 2 and u["loss_tokens"] > 0 for u in updates)
    assert policy.updates == 2 and not policy.pending
    for n, p in policy.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in policy.model.named_parameters() if n in lora)


def test_generation_is_seeded_and_leaves_the_global_rng(tokenizer):
    a, b = _peft_policy(tokenizer), _peft_policy(tokenizer)
    state = torch.get_rng_state()
    messages = [{"role": "user", "content": "hi"}]
    assert a.respond(messages) == b.respond(messages)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_config_and_messages_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="update_every"):
        OnlineConfig(update_every=0).validate()
    with pytest.raises(ValueError, match="signal_clip"):
        OnlineConfig(signal_clip=-1.0).validate()
    with pytest.raises(ValueError, match="preset"):
        OnlineConfig.from_preset("nope")
    assert OnlineConfig.from_preset("paper-personalization").lora_r == 64
    policy = _peft_policy(tokenizer)
    with pytest.raises(ValueError, match="must end with a user message"):
        policy.respond([{"role": "assistant", "content": "hi"}])


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _learn_messages(adapters, user_id, followup="Too long. Keep it short."):
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    reply = adapters.respond(user_id, messages) or "ok"
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": followup}]


def test_user_update_never_touches_other_users_or_base(tokenizer, tmp_path):
    config = OnlineConfig(update_every=1, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    adapters = UserAdapters(_model(), tokenizer, tmp_path, config)
    adapters.learn("bob", _learn_messages(adapters, "bob"))
    bob_params = adapters.policy("bob").parameters
    alice_params = adapters.policy("alice").parameters
    base_params = [p for n, p in adapters.model.named_parameters() if "lora_" not in n]
    before = (_digest(bob_params), _digest(base_params), _digest(alice_params),
              (tmp_path / "bob.pt").read_bytes())
    stats = adapters.learn("alice", _learn_messages(adapters, "alice"))
    assert stats is not None and stats["interactions"] == 1
    assert _digest(bob_params) == before[0]
    assert _digest(base_params) == before[1]
    assert _digest(alice_params) != before[2]
    assert (tmp_path / "bob.pt").read_bytes() == before[3]


def test_adapters_round_trip(tokenizer, tmp_path):
    config = OnlineConfig(update_every=2, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    first = UserAdapters(_model(), tokenizer, tmp_path, config)
    for _ in range(3):  # one update, one interaction left pending
        first.learn("alice", _learn_messages(first, "alice"))
    saved = {n: p.detach().clone() for n, p in first.model.named_parameters() if ".alice." in n}
    second = UserAdapters(_model(), tokenizer, tmp_path, config)
    policy = second.policy("alice")
    loaded = {n: p for n, p in second.model.named_parameters() if ".alice." in n}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert len(policy.pending) == 1 and policy.updates == 1
    assert policy.optimizer.state_dict()["state"]
    messages = [{"role": "user", "content": "What is gravity?"}]
    assert second.respond("alice", messages) == first.respond("alice", messages)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", ".hidden", "-x", "a b", "x" * 65, None, "é"])
def test_unsafe_user_ids_are_rejected(bad, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="user_id"):
        check_user_id(bad)
    adapters = UserAdapters(_model(), tokenizer, tmp_path, OnlineConfig(lora_r=4, max_new_tokens=4))
    with pytest.raises(ValueError, match="user_id"):
        adapters.respond(bad, [{"role": "user", "content": "hi"}])
    assert list(tmp_path.iterdir()) == []


def test_corrupt_adapter_file_is_reported(tokenizer, tmp_path):
    (tmp_path / "carol.pt").write_bytes(b"not a checkpoint")
    adapters = UserAdapters(_model(), tokenizer, tmp_path, OnlineConfig(lora_r=4, max_new_tokens=4))
    with pytest.raises(ValueError, match="cannot read the adapter file of user 'carol'"):
        adapters.policy("carol")
    assert (tmp_path / "carol.pt").read_bytes() == b"not a checkpoint"


def test_empty_generation_is_not_shown_to_the_user(tokenizer, monkeypatch):
    from sdpo_fast.online import loop

    policy = _peft_policy(tokenizer)
    monkeypatch.setattr(loop, "generate_batch", lambda *a, **k: ["" for _ in a[2]])

    class NoCalls:
        def reply(self, messages, response):
            raise AssertionError("the user saw an empty reply")

    with pytest.raises(loop.EmptyGenerationError, match="generated no text"):
        policy.respond([{"role": "user", "content": "hi"}])
    out = policy.interact_batch([[{"role": "user", "content": "hi"}]], NoCalls())
    assert out == [{"response": "", "followup": None, "update": None}] and not policy.pending
