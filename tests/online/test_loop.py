"""Online SDPO core: centred-advantage gradients, the loop, per-user adapters."""
from __future__ import annotations

import hashlib

import pytest
import torch

from sdpo_fast.data.interactions import Interaction
from sdpo_fast.data.prompts import encode_interaction
from sdpo_fast.online.adapters import UserAdapters, check_user_id
from sdpo_fast.online import loop
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config, run_online
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
    config = OnlineConfig(ignore_first_k=1, signal_clip=0.5, center_advantages=center, lora_r=0, lr=1.0,
                          loss_backend="torch")
    policy = OnlinePolicy(model, tokenizer, config, adapter_name=None)
    policy.optimizer = torch.optim.SGD(policy.parameters, lr=1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda _: 1.0)
    policy.pending = [loop.PendingInteraction(i, None) for i in INTERACTIONS]
    policy.update()
    for name, p in model.named_parameters():  # one SGD step at lr 1: the weight change is minus the gradient
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)


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


def _dir_digest(path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


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
    before = (_digest(bob_params), _digest(base_params), _digest(alice_params), _dir_digest(tmp_path / "bob"))
    stats = adapters.learn("alice", _learn_messages(adapters, "alice"))
    assert stats is not None and stats["interactions"] == 1
    assert _digest(bob_params) == before[0]
    assert _digest(base_params) == before[1]
    assert _digest(alice_params) != before[2]
    assert _dir_digest(tmp_path / "bob") == before[3]


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
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / "adapter_model.safetensors").write_bytes(b"not a checkpoint")
    adapters = UserAdapters(_model(), tokenizer, tmp_path, OnlineConfig(lora_r=4, max_new_tokens=4))
    with pytest.raises(ValueError, match="cannot read the adapter of user 'carol'"):
        adapters.policy("carol")
    assert (tmp_path / "carol" / "adapter_model.safetensors").read_bytes() == b"not a checkpoint"


def test_empty_generation_is_not_shown_to_the_user(tokenizer, monkeypatch):
    from sdpo_fast.online import loop

    policy = _peft_policy(tokenizer)
    monkeypatch.setattr(loop, "sample_batch", lambda *a, **k: [loop.Sample("", (2,)) for _ in a[2]])

    class NoCalls:
        def reply(self, messages, response):
            raise AssertionError("the user saw an empty reply")

    with pytest.raises(loop.EmptyGenerationError, match="generated no text"):
        policy.respond([{"role": "user", "content": "hi"}])
    out = policy.interact_batch([[{"role": "user", "content": "hi"}]], NoCalls())
    assert out == [{"response": "", "followup": None, "update": None}] and not policy.pending


def test_updates_learn_from_the_sampled_token_ids(tokenizer, monkeypatch):
    from sdpo_fast.online import loop

    policy = _peft_policy(tokenizer, update_every=6, max_new_tokens=12)
    generated = []
    generate = policy.model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        generated.append((kwargs["input_ids"], kwargs["attention_mask"], out))
        return out

    learned = []
    step = loop.train_step

    def recording_step(model, encoded, *args, **kwargs):
        learned.extend(encoded)
        return step(model, encoded, *args, **kwargs)

    monkeypatch.setattr(policy.model, "generate", recording_generate)
    monkeypatch.setattr(loop, "train_step", recording_step)
    prompts = ["How do I boil an egg?", "What is gravity?", "Plan a trip.", "Why is the sky blue?",
               "Explain compound interest.", "hi"]
    records = run_online(policy, RuleUser(get_persona("concise-casual-beginner")), prompts, 6)

    expected_prompts, expected_completions = [], []
    for input_ids, mask, out in generated:
        width = input_ids.shape[1]
        for row, row_mask, full in zip(input_ids.tolist(), mask.tolist(), out.tolist()):
            new = full[width:]
            stop = next((i + 1 for i, t in enumerate(new) if t in policy.stop_token_ids), len(new))
            if tokenizer.decode(new[:stop], skip_special_tokens=True).strip():
                expected_prompts.append([t for t, m in zip(row, row_mask) if m])
                expected_completions.append(new[:stop])
    assert len(expected_completions) == len(learned) >= 4
    assert [e.completion_ids for e in learned] == expected_completions
    assert [e.student_input_ids[:e.student_prompt_len] for e in learned] == expected_prompts
    retokenized = [tokenizer(tokenizer.decode(c, skip_special_tokens=True).strip(), add_special_tokens=False)
                   ["input_ids"] for c in expected_completions]
    assert any(r != c[:len(r)] or len(c) - len(r) not in (0, 1) for r, c in zip(retokenized, expected_completions)), \
        "no sampled reply tokenizes differently from its text: the test would not tell the two apart"
    update = next(r["update"] for r in records if r["update"])
    assert update["retokenized"] == 0


def test_learn_uses_the_ids_of_the_users_recent_reply(tokenizer, tmp_path):
    config = OnlineConfig(update_every=3, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    adapters = UserAdapters(_model(), tokenizer, tmp_path, config)
    policy = adapters.policy("alice")
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    reply = adapters.respond("alice", messages)
    sampled = policy.recent[reply].token_ids
    adapters.learn("alice", messages + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": "Shorter."}])
    adapters.learn("alice", messages + [{"role": "assistant", "content": "Written by someone else."},
                                        {"role": "user", "content": "Shorter."}])
    assert [p.completion_ids for p in policy.pending] == [sampled, None]
    reloaded = UserAdapters(_model(), tokenizer, tmp_path, config).policy("alice")
    assert [p.completion_ids for p in reloaded.pending] == [sampled, None]
    stats = adapters.learn("alice", messages + [{"role": "assistant", "content": "Also not sampled."},
                                                {"role": "user", "content": "Shorter."}])
    assert stats["interactions"] == 3 and stats["retokenized"] == 2


def _chat(adapters, order):
    for user_id in order:
        adapters.learn(user_id, _learn_messages(adapters, user_id))


def test_least_recently_used_adapters_are_unloaded_without_changing_results(tokenizer, tmp_path):
    config = OnlineConfig(update_every=2, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    order = ["alice", "bob", "carol", "alice", "bob", "alice", "carol", "bob", "carol"]
    bounded = UserAdapters(_model(), tokenizer, tmp_path / "bounded", config, max_loaded_users=1)
    _chat(bounded, order)
    assert list(bounded.policies) == ["carol"] and list(bounded.model.peft_config) == ["carol"]
    unbounded = UserAdapters(_model(), tokenizer, tmp_path / "unbounded", config)
    _chat(unbounded, order)
    for user_id in ("alice", "bob", "carol"):
        bounded.unload(user_id)
        unbounded.unload(user_id)
        assert _dir_digest(tmp_path / "bounded" / user_id) == _dir_digest(tmp_path / "unbounded" / user_id), user_id
    with pytest.raises(ValueError, match="max_loaded_users"):
        UserAdapters(_model(), tokenizer, tmp_path, config, max_loaded_users=0)


def test_saved_adapter_loads_with_peft(tokenizer, tmp_path):
    from peft import PeftModel

    config = OnlineConfig(update_every=1, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    adapters = UserAdapters(_model(), tokenizer, tmp_path, config)
    adapters.learn("alice", _learn_messages(adapters, "alice"))
    adapters.learn("bob", _learn_messages(adapters, "bob"))
    ids = torch.tensor([tokenizer("How do I boil an egg?")["input_ids"]])
    adapters.model.set_adapter("alice")
    with torch.no_grad():
        expected = adapters.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(_model(), tmp_path / "alice").eval()
        with loaded.disable_adapter():
            assert not torch.equal(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_an_interrupted_save_is_recovered(tokenizer, tmp_path):
    config = OnlineConfig(update_every=1, max_new_tokens=8, lora_r=4, lora_alpha=8, lr=1e-2)
    adapters = UserAdapters(_model(), tokenizer, tmp_path, config)
    adapters.learn("alice", _learn_messages(adapters, "alice"))
    saved = _dir_digest(tmp_path / "alice")
    (tmp_path / "alice").rename(tmp_path / ".alice.old123")  # crash after moving the old copy aside
    (tmp_path / ".alice.tmp123").mkdir()  # and before the new copy was renamed into place
    (tmp_path / ".alice.tmp123" / "adapter_model.safetensors").write_bytes(b"half written")
    again = UserAdapters(_model(), tokenizer, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice"]
    assert _dir_digest(tmp_path / "alice") == saved
    assert again.policy("alice").updates == 1


def _fake_vllm(monkeypatch, calls):
    """A stand-in for the documented parts of vLLM's API (LLM.generate with TokensPrompt, SamplingParams and
    LoRARequest) that greedily decodes with the LoRA adapter loaded from the request's path by peft."""
    import sys
    import types

    import transformers
    from peft import PeftModel

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, model, **options):
            self.model_path, self.options = model, options

        def generate(self, prompts, params, *, lora_request, use_tqdm):
            calls.append({"prompts": prompts, "params": params, "lora": lora_request, "options": self.options})
            base = transformers.AutoModelForCausalLM.from_pretrained(self.model_path)
            model = PeftModel.from_pretrained(base, lora_request.lora_path).eval()
            outputs = []
            for prompt, p in zip(prompts, params):
                assert p.temperature == 1e-3  # as good as greedy (the loss rejects temperatures below 1e-3)
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=p.max_tokens, eos_token_id=p.stop_token_ids)
                completion = types.SimpleNamespace(token_ids=out[0, ids.shape[1]:].tolist())
                outputs.append(types.SimpleNamespace(outputs=[completion]))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt = LLM, SamplingParams, dict
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_generator_samples_from_the_current_adapter(tokenizer, tmp_path, monkeypatch):
    from pathlib import Path

    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    from sdpo_fast.online.loop import sample_batch
    from sdpo_fast.online.vllm_generator import VLLMGenerator

    calls = []
    _fake_vllm(monkeypatch, calls)
    base = _model()
    base.save_pretrained(tmp_path / "base")
    config = OnlineConfig(update_every=2, max_new_tokens=6, lora_r=4, lora_alpha=8, lr=5e-2, temperature=1e-3)
    generator = VLLMGenerator(str(tmp_path / "base"), max_lora_rank=4, adapter_dir=tmp_path / "adapters")
    policy = OnlinePolicy(get_peft_model(base, lora_config(config)), tokenizer, config, generator=generator)
    prompts = [[{"role": "user", "content": "How do I boil an egg?"}], [{"role": "user", "content": "Why?"}]]
    user = RuleUser(get_persona("concise-casual-beginner"))
    weights = []
    for round_ in range(3):
        with policy.active():
            expected = sample_batch(policy.model, tokenizer, prompts, max_new_tokens=6, temperature=0.0,
                                    stop_token_ids=policy.stop_token_ids)
        weights.append({k: v.clone() for k, v in get_peft_model_state_dict(policy.model).items()})
        out = policy.interact_batch(prompts, user)
        assert [o["response"] for o in out] == [s.text for s in expected]
        served = load_file(Path(calls[-1]["lora"].lora_path) / "adapter_model.safetensors")
        assert served.keys() == weights[-1].keys() and all(torch.equal(served[k], weights[-1][k]) for k in served)
        if round_:
            assert any(not torch.equal(weights[-1][k], weights[-2][k]) for k in served)
        assert calls[-1]["lora"].lora_int_id == round_ + 1
        assert [p["prompt_token_ids"] for p in calls[-1]["prompts"]] == [
            tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False,
                                          enable_thinking=False)
            for m in prompts]
        assert [p.seed for p in calls[-1]["params"]] == [round_ * 2, round_ * 2 + 1]
    assert policy.updates == 3 and calls[0]["options"]["max_lora_rank"] == 8  # rank 4 served as 8
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["default-update2"]


def test_vllm_generator_errors(tokenizer, tmp_path, monkeypatch):
    import sys

    from sdpo_fast.online.vllm_generator import VLLMGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match="needs vLLM"):
        VLLMGenerator("model", max_lora_rank=8)
    _fake_vllm(monkeypatch, [])
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMGenerator("model", max_lora_rank=8, gpu_memory_utilization=1.5)
    generator = VLLMGenerator("model", max_lora_rank=8, adapter_dir=tmp_path)
    policy = OnlinePolicy(_model(), tokenizer, OnlineConfig(lora_r=0), adapter_name=None, generator=generator)
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        policy.respond([{"role": "user", "content": "hi"}])


def test_vllm_generator_takes_each_calls_sampling(tokenizer, tmp_path, monkeypatch):
    """A call's temperature, top_p and max_new_tokens reach SamplingParams; what vLLM cannot record exactly for
    importance clipping (greedy, top-p log-probs before 0.10.2) is refused naming the argument."""
    import sys

    from peft import get_peft_model

    from sdpo_fast.online.vllm_generator import VLLMGenerator

    calls = []
    _fake_vllm(monkeypatch, calls)
    base = _model()
    base.save_pretrained(tmp_path / "base")
    config = OnlineConfig(max_new_tokens=6, lora_r=4, lora_alpha=8, temperature=0.7)
    generator = VLLMGenerator(str(tmp_path / "base"), max_lora_rank=4, adapter_dir=tmp_path / "adapters")
    policy = OnlinePolicy(get_peft_model(base, lora_config(config)), tokenizer, config, generator=generator)
    (sample,) = generator.sample(policy, [[{"role": "user", "content": "hi"}]], 3, temperature=1e-3, top_p=0.5,
                                 max_new_tokens=2)
    (params,) = calls[-1]["params"]
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (1e-3, 0.5, 2, 3)
    assert len(sample.token_ids) <= 2
    clipped = OnlinePolicy(policy.model, tokenizer, OnlineConfig(lora_r=4, lora_alpha=8, importance_clip=2.0),
                           generator=VLLMGenerator("model", max_lora_rank=4, behavior_logprobs=True))
    with pytest.raises(ValueError, match="temperature > 0"):
        clipped.generator.sample(clipped, [[{"role": "user", "content": "hi"}]], 0, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        clipped.generator.sample(clipped, [[{"role": "user", "content": "hi"}]], 0, top_p=0.9)
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.10.2rc1+cu128", raising=False)
    assert VLLMGenerator("model", max_lora_rank=4, behavior_logprobs=True).top_p_logprobs
    assert not clipped.generator.top_p_logprobs


def test_an_update_calls_sdpo_loss_once_per_micro_batch(tokenizer, monkeypatch):
    """Centring happens inside the loss call: no second no-grad pass over the vocabulary (10·N·d·V, not 12)."""
    from sdpo_fast.loss.objectives import sdpo as objective_module

    calls = []
    original = objective_module.sdpo_loss

    def counting(*args, **kwargs):
        calls.append(kwargs["center_advantages"])
        return original(*args, **kwargs)

    monkeypatch.setattr(objective_module, "sdpo_loss", counting)
    config = OnlineConfig(lora_r=0, update_every=3, micro_batch_tokens=10_000)
    policy = OnlinePolicy(_model(), tokenizer, config, adapter_name=None)
    policy.pending = [loop.PendingInteraction(i, None) for i in INTERACTIONS]
    stats = policy.update()
    assert calls == [True] and stats["interactions"] == 3


def test_vllm_gets_the_smallest_rank_it_accepts():
    from sdpo_fast.online.vllm_generator import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 9, 24, 64, 300, 320, 321, 512)] == \
        [8, 8, 8, 16, 32, 64, 320, 320, 512, 512]
    with pytest.raises(ValueError, match="largest LoRA rank vLLM serves"):
        vllm_max_lora_rank(513)
