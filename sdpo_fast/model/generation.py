"""Sampling replies from a chat model (Hugging Face generate), for the online loop, evaluation and serving:
chat-template prompt ids, seeded batched sampling with the sampler's log-probs, and the text-only helpers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loss.validation import MIN_TEMPERATURE
from .hf import eval_mode, unwrap_model


def default_template_kwargs(template) -> dict:
    """{"enable_thinking": False} for a chat template (str, or dict of named templates) with that switch
    (Qwen3: no thinking block before the reply), else {}."""
    text = " ".join(template.values()) if isinstance(template, dict) else (template or "")
    return {"enable_thinking": False} if "enable_thinking" in text else {}


@dataclass(frozen=True)
class Sample:
    """One sampled reply: its decoded text (special tokens skipped, stripped) and the sampled token ids, up to
    and including the stop token when one was sampled (a reply cut at max_new_tokens has none); logprobs: the
    log of the probability the sampler drew each of those ids with (its distribution at the sampling
    temperature, cut to the top_p nucleus and renormalised), or None when not recorded."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None


@torch.no_grad()
def sample_batch(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids: list[int] | None = None, logprobs: bool = False) -> list[Sample]:
    """One reply per chat in `conversations`, generated together (left padding; HF generate; sampling at
    `temperature` from the smallest set of tokens whose probability reaches `top_p` (nucleus; 1: the whole
    distribution), greedy at temperature 0).

    The global RNG is left untouched: sampling uses its own seed. stop_token_ids default: the tokenizer's eos.
    logprobs: record each Sample's log-probs, log_softmax of generate's processed scores (logits / temperature,
    -inf outside the nucleus) at the sampled id; needs temperature > 0 (greedy decoding draws from no
    distribution).
    """
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow the "
                         f"logits), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if logprobs and not temperature > 0:
        raise ValueError("logprobs need temperature > 0: greedy decoding has no sampling distribution to record "
                         "(importance clipping needs a sampled policy)")
    prompts = chat_prompt_ids(tokenizer, conversations)
    device = unwrap_model(model).get_input_embeddings().weight.device
    stops = stop_token_ids if stop_token_ids is not None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=float(top_p)) \
        if temperature > 0 else dict(do_sample=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        recorded = dict(output_scores=True, return_dict_in_generate=True) if logprobs else {}
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, **sampling, **recorded)
    if not logprobs:
        return [make_sample(tokenizer, row, stops) for row in out[:, width:].tolist()]
    generated = out.sequences[:, width:]
    # one (batch, V) step at a time: the scores of a whole reply would be (batch, steps, V)
    sampled = torch.stack([torch.log_softmax(scores.float(), -1).gather(1, generated[:, t, None])[:, 0]
                           for t, scores in enumerate(out.scores)], 1)
    return [make_sample(tokenizer, row, stops, lps) for row, lps in zip(generated.tolist(), sampled.tolist())]


def chat_prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """The chat-template prompt ids (generation prompt added, thinking off where the template has the switch)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
    kwargs = default_template_kwargs(tokenizer.chat_template)
    return [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **kwargs),
                      add_special_tokens=False)["input_ids"] for m in conversations]


def make_sample(tokenizer, generated: list[int], stop_token_ids: list[int],
                logprobs: list[float] | None = None) -> Sample:
    """A Sample of the generated ids (and their log-probs, same length), cut after the first stop token (what
    follows is padding)."""
    end = next((i + 1 for i, t in enumerate(generated) if t in stop_token_ids), len(generated))
    ids = tuple(generated[:end])
    return Sample(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                  None if logprobs is None else tuple(logprobs[:end]))


def generate_batch(model, tokenizer, conversations: list[list[dict]], **options) -> list[str]:
    """The texts of `sample_batch` (same options)."""
    return [s.text for s in sample_batch(model, tokenizer, conversations, **options)]


def generate(model, tokenizer, messages: list[dict], **options) -> str:
    """`generate_batch` for one chat."""
    return generate_batch(model, tokenizer, [messages], **options)[0]
