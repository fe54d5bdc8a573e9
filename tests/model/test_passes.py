"""Packed, prefix-reusing passes against plain per-sequence Hugging Face forwards (eager attention)."""
from __future__ import annotations

import copy

import pytest
import torch

from sdpo_fast.data import EncodedInteraction, Interaction, encode_interactions
from sdpo_fast.model import (
    ATTN_IMPLEMENTATION,
    apply_liger_kernels,
    enable_checkpointing,
    forward_micro_batch,
    micro_batch_indices,
)
from sdpo_fast.explain import score_interactions
from sdpo_fast.model.passes import reuse_lengths
from sdpo_fast.loss.reference import reference_token_logprobs
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

ARCHS = ["qwen3", "llama", "olmo2"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_LONG = ("Can you explain how photosynthesis works in simple terms? Please answer in a bulleted list "
         "instead of a long paragraph. ") * 6


def _interactions() -> list[Interaction]:
    return [
        Interaction(history=[{"role": "user", "content": "Hi"}], completion="Sure!", followup="Thanks"),
        Interaction(
            history=[
                {"role": "system", "content": "You are a helpful assistant. Answer concisely and accurately."},
                {"role": "user", "content": _LONG},
                {"role": "assistant", "content": "Water boils at 100 degrees Celsius at sea level. " * 4},
                {"role": "user", "content": _LONG + "Make it more formal and remove the emojis."},
            ],
            completion="Step 1: preheat the oven. Step 2: mix the flour and the eggs. Step 3: bake. " * 3,
            followup="I asked for a summary in two sentences, not five paragraphs.",
        ),
        Interaction(
            history=[{"role": "user", "content": "Could you translate this sentence into French and German?"}],
            completion="Here is a Python function that returns the sum of a list of numbers.",
            followup="You forgot to handle the empty list case; the code raises an error.",
        ),
    ]


def _hand_encoded() -> list[EncodedInteraction]:
    completion = [40, 41, 42, 43]
    student, unshared = [5, 6, 7, 8, 9], [11, 6, 7, 8, 12, 13]
    prefix_only = [20, 21, 22, 23, 24, 25, 26]
    return [
        # empty shared prefix: the teacher prompt differs from its first token on
        EncodedInteraction(student + completion, unshared + completion, completion, 0),
        # the teacher prompt is a prefix of the student prompt
        EncodedInteraction(prefix_only + completion, prefix_only[:4] + completion, completion, 4),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("qwen3")


@pytest.fixture(scope="module")
def encoded(tokenizer):
    items, skipped = encode_interactions(tokenizer, _interactions())
    assert not skipped
    return items + _hand_encoded()


def _model(arch, **overrides):
    return tiny_causal_lm(arch, initializer_range=0.2, **overrides)


def _eager_copy(model):
    ref = copy.deepcopy(model)
    base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    base.set_attn_implementation("eager")
    return ref


def _hf_logprobs(model, input_ids, completion_ids, temperature=1.0):
    """log_softmax(model(ids).logits / T) at the positions predicting the completion, one sequence at a time."""
    logits = model(input_ids=torch.tensor([input_ids])).logits[0].float() / temperature
    n = len(completion_ids)
    start = len(input_ids) - n - 1
    return logits[start:start + n].log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_test_models_are_sensitive(encoded):
    """The models used here give context-dependent scores (so equalities below are not trivially met)."""
    with torch.no_grad():
        model = _model("qwen3")
        e = encoded[1]
        student = _hf_logprobs(model, e.student_input_ids, e.completion_ids)
        teacher = _hf_logprobs(model, e.teacher_input_ids, e.completion_ids)
    assert (student - teacher).abs().max() > 0.05
    assert student.std() > 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_per_sequence_forwards(arch, tokenizer, encoded):
    model = _model(arch).train()
    ref = _eager_copy(model).eval()
    items = _interactions() + _hand_encoded()
    assert reuse_lengths(encoded[-2:]) == [0, 3]
    scored = score_interactions(model, tokenizer, items, micro_batch_tokens=160)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert len(scored) == len(items)
    with torch.no_grad():
        for e, s in zip(encoded, scored):
            assert s.student_input_ids.tolist() == e.student_input_ids
            assert s.teacher_input_ids.tolist() == e.teacher_input_ids
            assert s.completion_ids.tolist() == e.completion_ids
            student = _hf_logprobs(ref, e.student_input_ids, e.completion_ids)
            teacher = _hf_logprobs(ref, e.teacher_input_ids, e.completion_ids)
            for got in (s.student_logprobs, s.teacher_logprobs, s.advantages):
                assert got.dtype == torch.float32 and got.shape == (len(e.completion_ids),)
            torch.testing.assert_close(s.student_logprobs, student, atol=1e-5, rtol=0)
            torch.testing.assert_close(s.teacher_logprobs, teacher, atol=1e-5, rtol=0)
            torch.testing.assert_close(s.advantages, teacher - student, atol=2e-5, rtol=0)


def test_scores_with_temperature_and_without_reuse(encoded):
    model = _model("qwen3")
    scored = score_interactions(model, None, encoded, prefix_reuse=False, temperature=2.0, micro_batch_tokens=10_000)
    with torch.no_grad():
        for e, s in zip(encoded, scored):
            torch.testing.assert_close(s.student_logprobs, _hf_logprobs(model, e.student_input_ids,
                                                                        e.completion_ids, 2.0), atol=1e-5, rtol=0)
            torch.testing.assert_close(s.teacher_logprobs, _hf_logprobs(model, e.teacher_input_ids,
                                                                        e.completion_ids, 2.0), atol=1e-5, rtol=0)


def test_micro_batches_respect_the_token_budget(encoded):
    costs = [max(len(e.student_input_ids), len(e.teacher_input_ids)) for e in encoded]
    groups = micro_batch_indices(encoded, 160)
    assert sorted(i for g in groups for i in g) == list(range(len(encoded)))
    assert all(sum(costs[i] for i in g) <= 160 or len(g) == 1 for g in groups)
    assert max(costs) > 160 and len(groups) > 1
    model = _model("qwen3")
    one_by_one = score_interactions(model, None, encoded, micro_batch_tokens=1)
    all_at_once = score_interactions(model, None, encoded, micro_batch_tokens=100_000)
    for a, b in zip(one_by_one, all_at_once):
        torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.student_logprobs, b.student_logprobs, atol=1e-5, rtol=0)


def test_full_teacher_pass_equals_reuse_pass(encoded):
    model = _model("llama")
    with torch.no_grad():
        reuse = forward_micro_batch(model, encoded, prefix_reuse=True)
        full = forward_micro_batch(model, encoded, prefix_reuse=False)
    torch.testing.assert_close(reuse.student_hidden, full.student_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(reuse.teacher_hidden, full.teacher_hidden, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION


def test_batch_fields(encoded):
    model = _model("olmo2")
    batch = forward_micro_batch(model, encoded)
    lengths = [len(e.completion_ids) for e in encoded]
    n = sum(lengths)
    assert batch.student_hidden.shape == batch.teacher_hidden.shape == (n, model.config.hidden_size)
    assert batch.student_hidden.requires_grad and not batch.teacher_hidden.requires_grad
    assert batch.target_ids.tolist() == [t for e in encoded for t in e.completion_ids]
    assert batch.sequence_index.tolist() == [i for i, c in enumerate(lengths) for _ in range(c)]
    assert batch.position_in_completion.tolist() == [k for c in lengths for k in range(c)]
    assert batch.lm_head_weight is model.lm_head.weight and batch.teacher_lm_head_weight is None


def _grads(model, loss):
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _check_student_gradients(model, encoded):
    """d/dθ sum_k w_k log π(y_k) from the packed pass equals that of unpacked per-sequence forwards."""
    ref = _eager_copy(model)
    batch = forward_micro_batch(model, encoded)
    weights = torch.randn(batch.target_ids.shape, generator=torch.Generator().manual_seed(0))
    logprobs = reference_token_logprobs(batch.student_hidden, batch.lm_head_weight, batch.target_ids)
    got = _grads(model, (weights * logprobs).sum())

    per_sequence = [_hf_logprobs(ref, e.student_input_ids, e.completion_ids) for e in encoded]
    expected = _grads(ref, (weights * torch.cat(per_sequence)).sum())
    assert got.keys() == expected.keys() and got
    for name in got:  # fp32 summation-order noise grows with the gradient's scale (embedding rows sum many tokens)
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(got[name], expected[name], atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        teacher = torch.cat([_hf_logprobs(ref, e.teacher_input_ids, e.completion_ids) for e in encoded])
        torch.testing.assert_close(
            reference_token_logprobs(batch.teacher_hidden, batch.lm_head_weight, batch.target_ids),
            teacher, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, checkpointing", [("qwen3", False), ("llama", False), ("olmo2", True),
                                                 ("qwen3", True)])
def test_student_gradients_match_unpacked(arch, checkpointing, encoded):
    model = _model(arch, tie_word_embeddings=arch == "qwen3").train()
    if checkpointing:
        enable_checkpointing(model)
    _check_student_gradients(model, encoded)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_student_gradients_match_unpacked(checkpointing, encoded):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(_model("qwen3"), config).train()
    if checkpointing:
        enable_checkpointing(model)
    _check_student_gradients(model, encoded)


def test_other_teacher_model_runs_a_full_pass(encoded):
    model, teacher = _model("qwen3"), _model("qwen3", seed=1)
    with pytest.raises(ValueError, match="prefix_reuse"):
        forward_micro_batch(model, encoded, teacher_model=teacher)
    scored = score_interactions(model, None, encoded, prefix_reuse=False, teacher_model=teacher)
    assert teacher.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for e, s in zip(encoded, scored):
            expected = _hf_logprobs(teacher, e.teacher_input_ids, e.completion_ids)
            torch.testing.assert_close(s.teacher_logprobs, expected, atol=1e-5, rtol=0)


def test_bad_inputs_are_rejected(tokenizer, encoded):
    model = _model("qwen3")
    good = encoded[0]
    vocab = model.config.vocab_size
    cases = [
        (ValueError, "interactions", dict(interactions=[])),
        (TypeError, r"interactions\[0\]", dict(interactions=["text"])),
        (ValueError, "micro_batch_tokens", dict(micro_batch_tokens=0)),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "attn_backend", dict(attn_backend="bogus")),
        (ValueError, "tokenizer", dict(tokenizer=None, interactions=_interactions()[:1])),
        (ValueError, "cannot be encoded", dict(interactions=[Interaction([{"role": "user", "content": "x"}],
                                                                        "reply", "  ")])),
        (ValueError, "differ", dict(interactions=[EncodedInteraction(
            good.student_input_ids, [good.teacher_input_ids[0] + 1] + good.teacher_input_ids[1:],
            good.completion_ids, 3)])),
        (ValueError, "vocabulary", dict(interactions=[EncodedInteraction(
            [vocab] + good.student_input_ids, good.teacher_input_ids, good.completion_ids, 0)])),
        (ValueError, "end with completion_ids", dict(interactions=[EncodedInteraction(
            good.student_input_ids + [1], good.teacher_input_ids, good.completion_ids, 0)])),
    ]
    for error, match, overrides in cases:
        kwargs = dict(model=model, tokenizer=tokenizer, interactions=encoded) | overrides
        with pytest.raises(error, match=match):
            score_interactions(**kwargs)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        score_interactions(torch.nn.Linear(2, 2), tokenizer, encoded)
    assert model.config._attn_implementation == "sdpa"


def test_model_that_drops_the_call_is_rejected(encoded):
    model = _model("llama")
    for layer in model.model.layers:
        layer.self_attn.forward = lambda *args, _forward=layer.self_attn.forward, sdpo_call=None, **kwargs: (
            _forward(*args, **kwargs))
    with pytest.raises(TypeError, match="sdpo_call"):
        forward_micro_batch(model, encoded)


def test_liger_is_skipped_off_cuda():
    assert apply_liger_kernels(_model("llama")) is False


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_backends_agree(arch, encoded):
    model = _model(arch).to("cuda", torch.bfloat16)
    fast = score_interactions(model, None, encoded, attn_backend="auto")
    plain = score_interactions(model, None, encoded, attn_backend="sdpa")
    full = score_interactions(model, None, encoded, attn_backend="sdpa", prefix_reuse=False)
    for a, b, c in zip(fast, plain, full):
        torch.testing.assert_close(a.student_logprobs, b.student_logprobs, atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(b.teacher_logprobs, c.teacher_logprobs, atol=5e-2, rtol=2e-2)


@pytest.mark.cuda
@cuda
def test_cuda_fp32_checkpointed_student_pass_and_liger(encoded):
    model = _model("llama").to("cuda").train()
    enable_checkpointing(model)
    batch = forward_micro_batch(model, encoded, attn_backend="sdpa")
    ref = _model("llama")
    with torch.no_grad():
        expected = torch.cat([_hf_logprobs(ref, e.student_input_ids, e.completion_ids) for e in encoded])
    got = reference_token_logprobs(batch.student_hidden, batch.lm_head_weight, batch.target_ids)
    torch.testing.assert_close(got.detach().cpu(), expected, atol=1e-4, rtol=0)
    if apply_liger_kernels(model):
        batch = forward_micro_batch(model, encoded, attn_backend="sdpa")
        got = reference_token_logprobs(batch.student_hidden, batch.lm_head_weight, batch.target_ids)
        torch.testing.assert_close(got.detach().cpu(), expected, atol=1e-3, rtol=0)


def test_behavior_logprobs_are_packed_aligned_with_the_targets(encoded):
    import dataclasses

    with_mu = [dataclasses.replace(e, behavior_logprobs=[-(i + 1) - k / 100 for k in range(len(e.completion_ids))])
               for i, e in enumerate(encoded)]
    with torch.no_grad():
        mb = forward_micro_batch(_model("qwen3"), with_mu)
        assert forward_micro_batch(_model("qwen3"), encoded).behavior_logprobs is None
    assert mb.behavior_logprobs.dtype == torch.float32 and mb.behavior_logprobs.shape == mb.target_ids.shape
    for target, seq, pos, mu in zip(mb.target_ids.tolist(), mb.sequence_index.tolist(),
                                    mb.position_in_completion.tolist(), mb.behavior_logprobs.tolist()):
        assert target == with_mu[seq].completion_ids[pos] and mu == pytest.approx(with_mu[seq].behavior_logprobs[pos])
    with pytest.raises(ValueError, match="mixes interactions with and without behavior_logprobs"):
        forward_micro_batch(_model("qwen3"), [with_mu[0], encoded[1]])
    short = dataclasses.replace(with_mu[0], behavior_logprobs=with_mu[0].behavior_logprobs[:-1])
    with pytest.raises(ValueError, match=r"encoded\[0\].behavior_logprobs has"):
        forward_micro_batch(_model("qwen3"), [short])
