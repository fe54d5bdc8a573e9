"""The background learner on the bundled tiny model: a batch of follow-ups gives the same adapter as the online
policy observing the same (x, y, u) with the same sampled ids, the next reply comes from that adapter, and a
crash before or after the adapter is saved neither loses nor repeats the update."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")

from safetensors.torch import load_file  # noqa: E402

from sdpo_fast.cli.online import _load  # noqa: E402
from sdpo_fast.demo import online_demo_settings, single_thread  # noqa: E402
from sdpo_fast.model.generation import sample_batch  # noqa: E402
from sdpo_fast.online.adapters import ADAPTER_FILE, STATE_FILE, UserAdapters  # noqa: E402
from sdpo_fast.online.config import resolve_online_config  # noqa: E402
from sdpo_fast.serve.app import ChatRequest  # noqa: E402

from serving import make_service  # noqa: E402

PROMPTS = ["Tell me about volcanoes.", "Give me tips for saving money.", "Explain chess to me.",
           "Any advice on cooking rice?"]


def followups(service, user: str = "alice") -> list:
    """One interaction per prompt: the reply, then a follow-up (whose own reply is one token)."""
    for prompt in PROMPTS:
        x = [{"role": "user", "content": prompt}]
        reply = service.complete(user, ChatRequest(x, None, False, False)).text
        history = x + [{"role": "assistant", "content": reply}, {"role": "user", "content": "No emojis, please."}]
        service.complete(user, ChatRequest(history, 1, False, False))
    return service.store.pending(user, 100)


def reference_adapters(tmp_path, items):
    """A fresh UserAdapters on a fresh model observing `items` (x, y, u, y's ids) directly."""
    model, tokenizer = _load(None, "cpu", 0)
    config = resolve_online_config(defaults=online_demo_settings(False))
    adapters = UserAdapters(model, tokenizer, tmp_path / "reference", config)
    policy = adapters.policy("alice")
    for item in items:
        policy.observe(item.prompt, item.reply, item.followup, item.token_ids)
    return adapters, policy


def test_an_update_is_the_online_policys_and_the_next_reply_uses_it(tmp_path):
    with single_thread():
        service = make_service(tmp_path / "state", learn=True)
        service.store.add_user("alice")
        items = followups(service)
        assert len(items) == 4 and all(i.token_ids for i in items)
        assert service.learner.run_pending() == 1
        assert service.store.counts("alice") == {"conversations": 4, "replies": 8, "interactions": 4,
                                                 "learned": 4, "adapter_version": 1}
        reference, policy = reference_adapters(tmp_path, items)
        assert policy.updates == 1
        saved = load_file(service.store.adapters_dir / "alice" / ADAPTER_FILE)
        expected = load_file(reference.save("alice") / ADAPTER_FILE)
        assert saved.keys() == expected.keys()
        for name in saved:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
        assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in saved.items() if "lora_B" in k)

        x = [{"role": "user", "content": "Tell me about glaciers."}]
        served = service.complete("alice", ChatRequest(x, None, False, False)).text
        with policy.active():
            want = sample_batch(policy.model, reference.tokenizer, [x], max_new_tokens=policy.config.max_new_tokens,
                                temperature=policy.config.temperature, seed=policy.config.seed * 1_000_003 + 8,
                                stop_token_ids=policy.stop_token_ids)[0].text
        assert served == want


def test_a_crash_after_the_save_is_not_learned_twice(tmp_path):
    with single_thread():
        service = make_service(tmp_path / "state", learn=True)
        service.store.add_user("alice")
        items = followups(service)
        learner = service.learner
        policy = learner.adapters.policy("alice")
        for item in items:  # the update and its save, then a crash before the database records it
            policy.observe(item.prompt, item.reply, item.followup, item.token_ids)
        learner.adapters.save("alice")
        assert service.store.counts("alice")["learned"] == 0

        restarted = make_service(tmp_path / "state", learn=True)
        restarted.learner.reconcile()
        assert restarted.store.counts("alice")["learned"] == 4 and restarted.store.adapter_version("alice") == 1
        assert restarted.learner.run_pending() == 0
        state = torch.load(restarted.store.adapters_dir / "alice" / STATE_FILE, weights_only=True)
        assert state["updates"] == 1


def test_a_crash_before_the_save_learns_the_batch_on_restart(tmp_path):
    with single_thread():
        service = make_service(tmp_path / "state", learn=True)
        service.store.add_user("alice")
        items = followups(service)
        policy = service.learner.adapters.policy("alice")
        for item in items[:3]:  # part of the batch observed, nothing saved
            policy.observe(item.prompt, item.reply, item.followup, item.token_ids)

        restarted = make_service(tmp_path / "state", learn=True)
        restarted.learner.reconcile()
        assert restarted.store.counts("alice")["learned"] == 0
        assert restarted.learner.run_pending() == 1
        assert restarted.store.counts("alice")["learned"] == 4 and restarted.store.adapter_version("alice") == 1
        reference, _ = reference_adapters(tmp_path, items)
        saved = load_file(restarted.store.adapters_dir / "alice" / ADAPTER_FILE)
        expected = load_file(reference.save("alice") / ADAPTER_FILE)
        for name in saved:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
