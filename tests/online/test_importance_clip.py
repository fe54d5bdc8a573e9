"""Importance clipping online: the samplers' recorded log-probs against plain forwards, and an update with
importance_clip against a hand-built loss."""
from __future__ import annotations

import types

import pytest
import torch

from sdpo_fast.data.interactions import Interaction
from sdpo_fast.data.prompts import encode_interaction
from sdpo_fast.online import loop
from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, chat_prompt_ids, sample_batch
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

from helpers import sampling_logprobs

PROMPTS = [[{"role": "user", "content": "How do I boil an egg?"}],
           [{"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Write a long story about the sea, with many details."}]]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("qwen3")


def _model():
    return tiny_causal_lm("qwen3", initializer_range=0.2).eval()


def test_hf_sampler_logprobs_match_a_plain_forward(tokenizer):
    model, temperature = _model(), 0.7
    prompts = chat_prompt_ids(tokenizer, PROMPTS)
    assert len(prompts[0]) != len(prompts[1])  # the shorter prompt is left-padded
    free = sample_batch(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=temperature, seed=5,
                        stop_token_ids=[len(tokenizer) - 1], logprobs=True)
    # A stop token the first reply samples early and the second never: the first reply ends there, the second
    # runs on after it (its scores then sit next to padding).
    stop = next(t for t in free[0].token_ids[1:4] if t not in free[1].token_ids)
    samples = sample_batch(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=temperature, seed=5,
                           stop_token_ids=[stop], logprobs=True)
    assert samples[0].token_ids[-1] == stop and len(samples[0].token_ids) < len(samples[1].token_ids) == 12
    for prompt, sample in zip(prompts, samples):
        assert len(sample.logprobs) == len(sample.token_ids)
        expected = sampling_logprobs(model, prompt, sample.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), expected, rtol=0, atol=2e-5)
    assert sample_batch(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=temperature, seed=5,
                        stop_token_ids=[stop])[1].logprobs is None  # not recorded unless asked
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_batch(model, tokenizer, PROMPTS, max_new_tokens=4, temperature=0.0, logprobs=True)


def test_hf_sampler_logprobs_are_of_the_top_p_nucleus(tokenizer):
    """With top_p the recorded log-prob is that of the truncated, renormalised distribution sampled from."""
    model, temperature, top_p = _model(), 0.7, 0.8
    samples = sample_batch(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=temperature, top_p=top_p,
                           seed=5, logprobs=True)
    cut = 0
    for prompt, sample in zip(chat_prompt_ids(tokenizer, PROMPTS), samples):
        expected = sampling_logprobs(model, prompt, sample.token_ids, temperature, top_p)
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), expected, rtol=0, atol=2e-5)
        whole = sampling_logprobs(model, prompt, sample.token_ids, temperature)
        cut += int((expected - whole > 1e-3).sum())
    assert cut > 0  # the nucleus left tokens out, so its log-probs differ from the whole distribution's
    for options, message in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                             (dict(temperature=1e-4), "temperature")):
        with pytest.raises(ValueError, match=message):
            sample_batch(model, tokenizer, PROMPTS, max_new_tokens=4, **options)


def _hand_built_grads(model, encoded, behavior, clip, signal_clip, temperature):
    """Plain PyTorch: per-sequence centred, clipped advantages times min(exp(log pi - log mu), clip)."""
    model.zero_grad()
    total, ratios = 0.0, []
    for e, mu in zip(encoded, behavior):
        n = len(e.completion_ids)
        targets = torch.tensor(e.completion_ids)[:, None]
        student = model(input_ids=torch.tensor([e.student_input_ids])).logits[0, -n - 1:-1].float()
        lp = torch.log_softmax(student / temperature, -1).gather(-1, targets)[:, 0]
        with torch.no_grad():
            teacher = model(input_ids=torch.tensor([e.teacher_input_ids])).logits[0, -n - 1:-1].float()
            lq = torch.log_softmax(teacher / temperature, -1).gather(-1, targets)[:, 0]
        adv = (lq - lp).detach()
        adv = (adv - adv.mean()).clamp(-signal_clip, signal_clip)
        ratio = torch.exp(lp.detach() - torch.tensor(mu)).clamp(max=clip)
        ratios.append(ratio)
        total = total + -(ratio * adv * lp).mean() / len(encoded)
    total.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, torch.cat(ratios)


def _update_change(tokenizer, interactions, completion_ids, behavior, **options):
    model = tiny_causal_lm("qwen3", initializer_range=0.2).train()
    config = OnlineConfig(lora_r=0, lr=1.0, loss_backend="torch", temperature=0.8, signal_clip=0.5, **options)
    policy = OnlinePolicy(model, tokenizer, config, adapter_name=None)
    policy.optimizer = torch.optim.SGD(policy.parameters, lr=1.0)
    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda _: 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy.pending = [loop.PendingInteraction(i, tuple(ids), None if mu is None else tuple(mu))
                      for i, ids, mu in zip(interactions, completion_ids, behavior)]
    policy.update()
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}


def test_online_update_with_importance_clip_matches_a_hand_built_loss(tokenizer):
    interactions = [
        Interaction([{"role": "user", "content": "How do I boil an egg?"}],
                    "Sure! Step 1: preheat the oven. Step 2: mix the flour.", "Too long. Keep it short."),
        Interaction([{"role": "user", "content": "What is the capital of Australia?"}],
                    "The capital of Australia is Sydney.", "That is not correct, it is Canberra."),
    ]
    encoded = [encode_interaction(tokenizer, i) for i in interactions]
    ids = [e.completion_ids for e in encoded]
    g = torch.Generator().manual_seed(0)
    model = tiny_causal_lm("qwen3", initializer_range=0.2).train()
    with torch.no_grad():  # the model's own log-probs at T, perturbed by +-0.5 so that some ratios pass the clip
        behavior = []
        for e in encoded:
            n = len(e.completion_ids)
            logits = model(input_ids=torch.tensor([e.student_input_ids])).logits[0, -n - 1:-1].float() / 0.8
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(e.completion_ids)[:, None])[:, 0]
            behavior.append((lp + torch.empty(n).uniform_(-0.5, 0.5, generator=g)).clamp(max=0).tolist())
    clip = 1.1
    expected, ratios = _hand_built_grads(model, encoded, behavior, clip, 0.5, 0.8)
    assert (ratios == clip).any() and (ratios < 0.9).any()  # the clip bites on some tokens, not all
    change = _update_change(tokenizer, interactions, ids, behavior, importance_clip=clip)
    for name, value in change.items():  # one SGD step at lr 1: the weight change is the gradient
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    plain = _update_change(tokenizer, interactions, ids, behavior)
    assert any(not torch.allclose(plain[k], change[k], rtol=1e-3, atol=1e-6) for k in change)


def test_importance_clip_needs_the_samplers_logprobs(tokenizer):
    config = OnlineConfig(lora_r=0, update_every=2, max_new_tokens=6, importance_clip=2.0)
    policy = OnlinePolicy(tiny_causal_lm("qwen3", initializer_range=0.2), tokenizer, config, adapter_name=None)
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    with pytest.raises(ValueError, match="importance_clip needs the sampler's log-probs"):
        policy.observe(messages, "Written by someone else.", "Shorter.")
    assert not policy.pending
    reply = policy.respond_batch([messages])[0]
    sampled = policy.recent[reply]
    assert reply and len(sampled.logprobs) == len(sampled.token_ids)
    policy.observe(messages, reply, "Shorter.")
    assert policy.pending[0].completion_logprobs == sampled.logprobs
    with pytest.raises(ValueError, match="importance_clip must be"):
        OnlineConfig(importance_clip=0.0).validate()


def test_user_adapters_keep_the_logprobs_of_recent_replies_and_pending_interactions(tokenizer, tmp_path):
    from sdpo_fast.online.adapters import UserAdapters

    config = OnlineConfig(update_every=3, max_new_tokens=6, lora_r=4, lora_alpha=8, lr=1e-2, importance_clip=2.0)
    adapters = UserAdapters(tiny_causal_lm("qwen3", initializer_range=0.2), tokenizer, tmp_path, config)
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    first = adapters.respond("alice", messages)
    second = adapters.respond("alice", [{"role": "user", "content": "Why?"}])
    policy = adapters.policy("alice")
    sampled = {text: policy.recent[text] for text in (first, second)}
    adapters.learn("alice", messages + [{"role": "assistant", "content": first}, {"role": "user", "content": "Ok."}])
    reloaded = UserAdapters(tiny_causal_lm("qwen3", initializer_range=0.2), tokenizer, tmp_path, config)
    again = reloaded.policy("alice")
    assert again.pending[0].completion_logprobs == sampled[first].logprobs
    assert again.recent[second] == sampled[second]


# --- vLLM: the documented output shape, parsed (vLLM itself does not run here) --------------------------------


def _completion(token_ids, logprobs):
    """Shaped like vLLM's CompletionOutput with logprobs=0: per token a {token_id: Logprob} dict."""
    return types.SimpleNamespace(token_ids=token_ids, logprobs=[
        {t: types.SimpleNamespace(logprob=lp, rank=1, decoded_token=None)} for t, lp in zip(token_ids, logprobs)])


def test_vllm_logprobs_are_read_per_sampled_token():
    from sdpo_fast.online.vllm_generator import sampled_logprobs

    completion = _completion([5, 9, 2], [-1.5, -0.25, 1e-9])
    completion.logprobs[1][7] = types.SimpleNamespace(logprob=-0.1)  # a top-k entry beside the sampled one
    assert sampled_logprobs(completion) == [-1.5, -0.25, 0.0]
    with pytest.raises(ValueError, match="no log-prob"):
        sampled_logprobs(types.SimpleNamespace(token_ids=[5, 9], logprobs=None))
    wrong = _completion([5, 9], [-1.0, -2.0])
    wrong.logprobs[1] = {3: types.SimpleNamespace(logprob=-2.0)}
    with pytest.raises(ValueError, match="lack the sampled token at positions \\[1\\]"):
        sampled_logprobs(wrong)


def test_vllm_generator_requests_processed_logprobs(tokenizer, tmp_path, monkeypatch):
    """A fake vLLM (documented API: LLM(logprobs_mode=...), SamplingParams(logprobs=0), CompletionOutput): the
    engine is built with processed_logprobs, each request asks for logprobs=0, and the Samples carry them."""
    import sys

    calls = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, model, **options):
            calls.append(options)

        def generate(self, prompts, params, *, lora_request, use_tqdm):
            calls.append(params)
            return [types.SimpleNamespace(outputs=[_completion([7, 8, tokenizer.eos_token_id], [-1.0, -2.0, -0.5])])
                    for _ in prompts]

    class LoRARequest:
        def __init__(self, *args):
            self.args = args

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt = LLM, SamplingParams, dict
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("sdpo_fast.online.vllm_generator.write_adapter", lambda *a: None)
    from sdpo_fast.online.vllm_generator import VLLMGenerator

    config = OnlineConfig(lora_r=4, lora_alpha=8, max_new_tokens=6, importance_clip=2.0)
    policy = types.SimpleNamespace(config=config, tokenizer=tokenizer, stop_token_ids=[tokenizer.eos_token_id],
                                   wants_logprobs=True, adapter_name="default", updates=0, model=None)
    with pytest.raises(ValueError, match="behavior_logprobs=True"):
        VLLMGenerator("m", max_lora_rank=4, adapter_dir=tmp_path).sample(policy, PROMPTS, 0)
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMGenerator("m", max_lora_rank=4, adapter_dir=tmp_path, behavior_logprobs=True, logprobs_mode="raw_logprobs")
    generator = VLLMGenerator("m", max_lora_rank=4, adapter_dir=tmp_path, behavior_logprobs=True)
    assert calls[-1]["logprobs_mode"] == "processed_logprobs"
    samples = generator.sample(policy, PROMPTS, 0)
    assert [p.logprobs for p in calls[-1]] == [0, 0]
    assert [s.token_ids for s in samples] == [(7, 8, tokenizer.eos_token_id)] * 2
    assert [s.logprobs for s in samples] == [(-1.0, -2.0, -0.5)] * 2
