"""The conformance matrix: every decoder family a user could plausibly train, as a tiny random model built from its
config class, is either exact or refused before its weights load.

Exact: the packed student and teacher log-probs (prefix-K/V teacher pass) equal plain per-sequence forwards of the
same model (transformers' eager attention, full logits; fp32), and one `train_step`'s gradients equal those of the
plain full-logits reference step. Refused: `check_model_support` (what `train` runs before loading weights) raises
one line naming why. Each family is built with the features that set it apart switched on and made to matter:
logit scale, logit soft cap, an lm_head bias, sliding windows shorter than the sequences, soft-capped attention,
tied embeddings. `scripts/models_table.py` writes docs/models.md from `conformance_row`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING

from sdpo_fast.loss import sdpo_loss
from sdpo_fast.model import EncodedInteraction, check_model_support, forward_micro_batch
from sdpo_fast.model.support import logit_transform
from sdpo_fast.train import TrainConfig, objective_of, reference_loss, step_options, train_step

VOCAB = 160
WINDOW = 5
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, initializer_range=0.2)
SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])

# family -> (model_type, config overrides, what the overrides exercise)
FAMILIES = {
    "Llama": ("llama", {}, ""),
    "Mistral": ("mistral", dict(sliding_window=WINDOW), "sliding window (every layer)"),
    "Qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              "sliding window (layers >= max_window_layers)"),
    "Qwen3": ("qwen3", dict(tie_word_embeddings=True), "tied embeddings"),
    "Qwen3-MoE": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "experts"),
    "Gemma": ("gemma", {}, "tied embeddings, scaled embeddings"),
    "Gemma-2": ("gemma2", dict(final_logit_softcapping=2.0, attn_logit_softcapping=3.0, **SLIDING),
                "logit soft cap, soft-capped attention, sliding window"),
    "Gemma-3 (text)": ("gemma3_text", dict(final_logit_softcapping=2.0, **SLIDING),
                       "logit soft cap, sliding window"),
    "Phi": ("phi", {}, "lm_head bias, partial rotary"),
    "Phi-3": ("phi3", dict(sliding_window=WINDOW), "sliding window"),
    "Cohere": ("cohere", dict(logit_scale=0.25), "logit scale"),
    "Cohere2": ("cohere2", dict(logit_scale=0.25, **SLIDING), "logit scale, sliding window"),
    "Granite": ("granite", dict(logits_scaling=4.0, embedding_multiplier=2.0, attention_multiplier=0.3,
                                residual_multiplier=0.5), "logits_scaling (divides)"),
    "OLMo-2": ("olmo2", {}, ""),
    "GPT-NeoX": ("gpt_neox", dict(use_parallel_residual=True), "parallel residual"),
    "SmolLM3": ("smollm3", dict(tie_word_embeddings=True), "no-RoPE layers, tied embeddings"),
    "Starcoder2": ("starcoder2", dict(sliding_window=WINDOW), "biases, sliding window"),
    "GPT-OSS": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
                "attention sinks"),
    "Falcon": ("falcon", dict(drop=("head_dim",)), ""),
    "Llama-4 (text)": ("llama4_text", {}, "chunked attention"),
    "RecurrentGemma": ("recurrent_gemma", {}, ""),
}
LOGPROB_ATOL = 2e-5


@dataclass
class Row:
    family: str
    model_type: str
    exercised: str
    status: str
    detail: str = ""
    logprob_error: float | None = None
    grad_error: float | None = None


def tiny_config(model_type: str, overrides: dict):
    """BASE with `overrides`, less the BASE keys named in overrides["drop"] (fields the config class derives)."""
    overrides = dict(overrides)
    drop = overrides.pop("drop", ())
    base = {k: v for k, v in BASE.items() if k not in drop}
    return CONFIG_MAPPING[model_type](**{**base, **overrides})


def tiny_model(config, seed: int = 0):
    """fp32, eval mode, random weights from `seed` (the global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            torch.nn.init.normal_(head.bias, std=1.0)  # Phi's zero-initialized bias would test nothing
    return model.to(torch.float32).eval()


def interactions(seed: int = 1) -> list[EncodedInteraction]:
    """Three interactions longer than the window: shared prefixes of 0, 4 and 7 tokens, teacher prompts that
    differ after them, completions of 9, 6 and 11 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    out = []
    for shared, student_extra, teacher_extra, completion_len in ((0, 5, 8, 9), (4, 3, 6, 6), (7, 2, 9, 11)):
        prefix, completion = ids(shared), ids(completion_len)
        student, teacher = prefix + ids(student_extra), prefix + ids(teacher_extra)
        out.append(EncodedInteraction(student + completion, teacher + completion, completion, shared))
    return out


def plain_logprobs(model, input_ids: list[int], n: int) -> torch.Tensor:
    ids = torch.tensor([input_ids])
    logits = model(input_ids=ids).logits[0, -n - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, -n:, None]).squeeze(-1)


def packed_logprobs(model, encoded):
    batch = forward_micro_batch(model, encoded, prefix_reuse=True)
    _, stats = sdpo_loss(batch.student_hidden, batch.lm_head_weight, batch.target_ids,
                         teacher_hidden=batch.teacher_hidden, backend="torch", return_stats=True,
                         **batch.loss_kwargs())
    return stats.student_logprobs, stats.teacher_logprobs


class CaptureGrads(torch.optim.Optimizer):
    """An optimizer whose step records each parameter's gradient by name and changes nothing."""

    def __init__(self, named):
        self.names = {id(p): n for n, p in named}
        super().__init__([p for _, p in named], {"lr": 0.0})
        self.grads = {}

    def step(self, closure=None):
        self.grads = {self.names[id(p)]: p.grad.clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None}


def step_gradients(model, encoded, config: TrainConfig) -> dict:
    optimizer = CaptureGrads([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train_step(model, encoded, objective_of(config), optimizer, scheduler,
               dataclasses.replace(step_options(config), max_grad_norm=None))
    return optimizer.grads


def reference_gradients(model, encoded, config: TrainConfig) -> dict:
    loss = reference_loss(model, encoded, ignore_first_k=config.ignore_first_k, aggregation=config.aggregation,
                          temperature=config.temperature)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def conformance_row(family: str) -> Row:
    """The family's matrix entry; AssertionError when it is neither exact nor refused up front."""
    model_type, overrides, exercised = FAMILIES[family]
    config = tiny_config(model_type, overrides)
    try:
        check_model_support(config)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message and message
        return Row(family, model_type, exercised, "refused up front", message)
    scale, softcap = logit_transform(config)
    model = tiny_model(config)
    reference = copy.deepcopy(model)
    encoded = interactions()
    with torch.no_grad():
        student, teacher = packed_logprobs(model, encoded)
        plain_student = torch.cat([plain_logprobs(reference, e.student_input_ids, len(e.completion_ids))
                                   for e in encoded])
        plain_teacher = torch.cat([plain_logprobs(reference, e.teacher_input_ids, len(e.completion_ids))
                                   for e in encoded])
    logprob_error = max((student - plain_student).abs().max().item(), (teacher - plain_teacher).abs().max().item())
    assert logprob_error <= LOGPROB_ATOL, f"{family}: packed log-probs off by {logprob_error:.2e}"

    train_config = TrainConfig(micro_batch_tokens=100_000, max_grad_norm=None, temperature=0.9)
    got = step_gradients(model, encoded, train_config)
    expected = reference_gradients(reference, encoded, train_config)
    assert got.keys() == {n for n, g in expected.items() if g is not None}
    grad_error = 0.0
    for name, value in got.items():  # fp32 summation-order noise grows with the gradient's scale
        scale_of = max(1.0, expected[name].abs().max().item())
        error = (value - expected[name]).abs().max().item() / scale_of
        grad_error = max(grad_error, error)
        assert error <= 2e-5, f"{family} {name}: gradient off by {error:.2e} (relative to max(1, |g|))"
    features = [f"logit scale {scale:g}" if scale != 1.0 else "", f"logit soft cap {softcap:g}" if softcap else "",
                "lm_head bias" if getattr(model.get_output_embeddings(), "bias", None) is not None else ""]
    detail = ", ".join(f for f in features if f)
    return Row(family, model_type, exercised, "exact", detail, logprob_error, grad_error)


def available(family: str) -> bool:
    return FAMILIES[family][0] in CONFIG_MAPPING


@pytest.mark.parametrize("family", [f for f in FAMILIES if available(f)])
def test_family_is_exact_or_refused_up_front(family):
    row = conformance_row(family)
    assert row.status in ("exact", "refused up front")


@pytest.mark.parametrize("family, reason", [("GPT-OSS", "s_aux"), ("Falcon", "AttentionInterface"),
                                            ("Llama-4 (text)", "is_causal"),
                                            ("RecurrentGemma", "logits_soft_cap")])
def test_refusals_name_why(family, reason):
    if not available(family):
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    row = conformance_row(family)
    assert row.status == "refused up front" and reason in row.detail


@pytest.mark.parametrize("family", ["Gemma-2", "Phi", "Cohere", "Granite", "Mistral"])
def test_the_features_matter(family):
    """Without its logit head or window the packed pass would be wrong: the check can fail."""
    model_type, overrides, _ = FAMILIES[family]
    model = tiny_model(tiny_config(model_type, overrides))
    reference = copy.deepcopy(model)
    encoded = interactions()
    with torch.no_grad():
        batch = forward_micro_batch(model, encoded, prefix_reuse=True)
        plain = torch.cat([plain_logprobs(reference, e.student_input_ids, len(e.completion_ids)) for e in encoded])
        bare = sdpo_loss(batch.student_hidden, batch.lm_head_weight, batch.target_ids,
                         teacher_hidden=batch.teacher_hidden, backend="torch", return_stats=True)[1]
        headed = sdpo_loss(batch.student_hidden, batch.lm_head_weight, batch.target_ids,
                           teacher_hidden=batch.teacher_hidden, backend="torch", return_stats=True,
                           **batch.loss_kwargs())[1]
        if family == "Mistral":  # the window: a plain forward of the same weights without it differs
            unwindowed = copy.deepcopy(reference)
            unwindowed.config.sliding_window = None
            for layer in unwindowed.model.layers:
                layer.self_attn.sliding_window = None
            wide = torch.cat([plain_logprobs(unwindowed, e.student_input_ids, len(e.completion_ids))
                              for e in encoded])
            assert (wide - plain).abs().max() > 1e-3
            return
    assert (bare.student_logprobs - plain).abs().max() > 1e-3
    assert (headed.student_logprobs - plain).abs().max() <= LOGPROB_ATOL


def test_train_refuses_before_weights_load(tmp_path, monkeypatch, data_path):
    """`train` on a saved model of a refused family stops at the config check: no weights are read."""
    from sdpo_fast.testing import tiny_tokenizer
    from sdpo_fast.train import setup, trainer

    config = tiny_config("gpt_oss", dict(FAMILIES["GPT-OSS"][1], vocab_size=len(tiny_tokenizer("qwen3"))))
    model_dir = tmp_path / "model"
    tiny_model(config).save_pretrained(model_dir)
    tiny_tokenizer("qwen3").save_pretrained(model_dir)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(setup, "load_model", no_weights)
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", no_weights)
    with pytest.raises(ValueError, match="s_aux"):
        trainer.train(TrainConfig(model=str(model_dir), data=data_path, output_dir=str(tmp_path / "run"),
                                  device="cpu", max_steps=1), progress=False)


def test_soft_capped_attention_outside_the_packed_passes():
    """A Gemma-2 model switched to sdpo_varlen computes its soft-capped attention outside the packed passes too
    (generation, plain forwards): its logits equal the eager model's, with and without padding."""
    from sdpo_fast.model import sdpo_attention

    model_type, overrides, _ = FAMILIES["Gemma-2"]
    model = tiny_model(tiny_config(model_type, overrides))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), sdpo_attention(model):
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=0)


def test_check_model_name_reads_the_saved_config_and_an_adapters_base(tmp_path):
    """From a directory: a refused family's saved config is refused by name; an adapter directory is judged by its
    base model's config."""
    peft = pytest.importorskip("peft")
    from sdpo_fast.model import check_model_name

    refused = tmp_path / "gpt_oss"
    tiny_config("gpt_oss", FAMILIES["GPT-OSS"][1]).save_pretrained(refused)
    with pytest.raises(ValueError, match="s_aux"):
        check_model_name(str(refused))
    base = tmp_path / "gemma2"
    model = tiny_model(tiny_config("gemma2", FAMILIES["Gemma-2"][1]))
    model.save_pretrained(base)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)  # as from a model loaded from `base`
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert not (adapter / "config.json").exists()
    check_model_name(str(adapter))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        check_model_name(str(adapter), attn_backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash-attn / torch varlen backends)")
@pytest.mark.parametrize("backend", ["flash", "torch", "sdpa"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cuda_backends_serve_windows_and_caps(backend, softcap):
    """Packed bf16 attention on CUDA with a window (and a soft cap where served), queries aligned bottom-right over
    longer keys as in the teacher pass, against the CPU fp32 path; refused by name where not served."""
    from sdpo_fast.model.attention import _flash_varlen, _torch_varlen, varlen_attention

    if (backend == "flash" and _flash_varlen() is None) or (backend == "torch" and _torch_varlen() is None):
        pytest.skip(f"attn_backend {backend!r} is not installed")
    g = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [7, 12, 5], [11, 12, 20]
    q = torch.randn(sum(lengths_q), 4, 16, generator=g)
    k, v = (torch.randn(sum(lengths_k), 2, 16, generator=g) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
                  for n in (lengths_q, lengths_k))
    expected = varlen_attention(q, k, v, cu_q, cu_k, lengths_q, lengths_k, backend="sdpa", window=WINDOW,
                                softcap=softcap)
    args = [t.cuda().bfloat16() for t in (q, k, v)] + [cu_q.cuda(), cu_k.cuda(), lengths_q, lengths_k]
    if softcap is not None and backend != "flash":
        with pytest.raises(ValueError, match="flash"):
            varlen_attention(*args, backend=backend, window=WINDOW, softcap=softcap)
        return
    got = varlen_attention(*args, backend=backend, window=WINDOW, softcap=softcap)
    torch.testing.assert_close(got.float().cpu(), expected, atol=3e-2, rtol=0)


def test_window_mask_is_transformers_sliding_window():
    """The packed passes' window, square (student) and aligned bottom-right over a longer key row (teacher after a
    reused prefix), equals transformers' causal sliding-window mask over the whole sequence."""
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    from sdpo_fast.model.attention import _window_mask

    allowed = and_masks(causal_mask_function, sliding_window_overlay(WINDOW))
    n_k = 13
    zero = torch.tensor(0)
    full = allowed(zero, zero, torch.arange(n_k)[:, None], torch.arange(n_k)[None, :])
    for n_q in (n_k, 6, 1):
        assert torch.equal(_window_mask(n_q, n_k, WINDOW, "cpu"), full[n_k - n_q:]), n_q
