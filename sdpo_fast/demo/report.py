"""Before/after report of the bundled demo: the model's own replies (no hindsight) to held-out requests, and the
share in the simulated users' preferred style (no emojis)."""
from __future__ import annotations

import random

import torch

from ..data import Interaction, InteractionEncoder
from .sample import random_request, style_subjects
from .style import preferred_style_rate

REPORT_PROMPTS = 64
REPORT_SEED = 12345


def prompt_ids(tokenizer, history: list[dict], followup: str | None = None) -> list[int]:
    """The trainer's student prompt for `history` (followup None) or its teacher prompt, hindsight block showing
    `followup` (exactly as `encode_interaction` renders them)."""
    encoded = InteractionEncoder(tokenizer).encode(Interaction(history, "x", followup or "x"))
    if followup is None:
        return encoded.student_input_ids[:encoded.student_prompt_len]
    return encoded.teacher_input_ids[:encoded.teacher_prompt_len]


def held_out_histories(n: int = REPORT_PROMPTS, seed: int = REPORT_SEED) -> list[list[dict]]:
    """n single-turn histories whose subjects the bundled sample never mentions."""
    rng = random.Random(seed)
    subjects = style_subjects(held_out=True)
    return [[{"role": "user", "content": random_request(rng, subjects).text}] for _ in range(n)]


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: list[list[int]], *, seed: int, temperature: float = 1.0,
                   max_new_tokens: int = 80, batch_size: int = 32) -> list[str]:
    """Replies sampled at `temperature` after each prompt (token ids), decoded without special tokens. The
    global RNG is left untouched; same seed, model and prompts, same replies."""
    end = InteractionEncoder(tokenizer).end_of_turn_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    replies = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                     top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=end,
                                     pad_token_id=pad)
                replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [r.strip() for r in replies]


def preferred_rate(model, tokenizer, *, n: int = REPORT_PROMPTS, seed: int = REPORT_SEED) -> float:
    """Share of the model's own replies (no hindsight) to n held-out requests that have no emojis."""
    prompts = [prompt_ids(tokenizer, h) for h in held_out_histories(n, seed)]
    return preferred_style_rate(sample_replies(model, tokenizer, prompts, seed=seed))


def demo_prompts(seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Requests in the bundled tiny model's domain: 64 for training on its sample's subjects, `n_eval` for
    evaluation on held-out ones."""
    rng = random.Random(seed)
    train = [random_request(rng, style_subjects(held_out=False)).text for _ in range(64)]
    held_out = style_subjects(held_out=True)
    return train, [random_request(rng, held_out).text for _ in range(n_eval)]
