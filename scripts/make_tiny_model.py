"""Build the bundled tiny model and sample: `python scripts/make_tiny_model.py` (seeded, CPU, byte-reproducible).

1. Synthetic single-turn conversations (sdpo_fast.data.synthetic): requests answered in random styles (emojis or
   not, long or short, formal or casual), and follow-ups that complain about a style, ask for a change or change
   the topic.
2. A byte-level BPE tokenizer trained on them, with a Qwen3-like ChatML template.
3. A tiny Qwen3 trained with next-token cross-entropy on reply tokens of (a) plain prompts, reply style random,
   and (b) the trainer's teacher prompts (`encode_interaction`: hindsight block with the follow-up), reply
   granting the follow-up's wish.
4. Writes sdpo_fast/assets/tiny_model/ (safetensors, tokenizer, README.md model card) and
   sdpo_fast/assets/tiny_sample.jsonl, atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sdpo_fast.data import DEFAULT_HINDSIGHT_TEMPLATE, Interaction, InteractionEncoder
from sdpo_fast.data.synthetic import write_jsonl
from sdpo_fast.demo.sample import (
    STYLE_FOLLOWUP_KINDS, STYLE_SAMPLE_SEED, STYLE_SAMPLE_SIZE, generate_preference_conversations, random_request,
    random_style, style_followup, style_subjects, styled_reply, wished_style,
)
from sdpo_fast.demo.style import preferred_style_rate
from sdpo_fast.testing import _QWEN3_TEMPLATE
from sdpo_fast.demo.report import held_out_histories, prompt_ids, sample_replies

ASSETS = Path(__file__).resolve().parent.parent / "sdpo_fast" / "assets"
SEED = 0
VOCAB_SIZE = 1024
ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)
TRAIN = dict(examples=24_000, hindsight_share=0.5, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.01)
# Hindsight examples draw the follow-up kind with these weights (unrelated follow-ups weigh more, so that the
# model learns that they leave the style as it is).
FOLLOWUP_WEIGHTS = {"topic_change": 3, "emoji_complaint": 2}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SUBJECTS = style_subjects(held_out=False) + style_subjects(held_out=True)


def make_example(rng: random.Random, hindsight: bool) -> tuple[Interaction, bool]:
    """A single-turn interaction; with hindsight the reply grants the follow-up's wish, else its style is random."""
    request = random_request(rng, SUBJECTS)
    weights = [FOLLOWUP_WEIGHTS.get(k, 1) for k in STYLE_FOLLOWUP_KINDS]
    kind = rng.choices(STYLE_FOLLOWUP_KINDS, weights)[0]
    style = wished_style(kind, rng) if hindsight else random_style(rng)
    reply = styled_reply(request, style, rng)
    followup = style_followup(kind, rng, SUBJECTS, request)
    return Interaction([{"role": "user", "content": request.text}], reply, followup), hindsight


def train_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(["<think>", "</think>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=_QWEN3_TEMPLATE,
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")


def encode_examples(tokenizer, examples) -> list[tuple[list[int], int]]:
    """(input ids, prompt length): the student ids for plain examples, the teacher ids for hindsight ones."""
    encoder = InteractionEncoder(tokenizer)
    out = []
    for interaction, hindsight in examples:
        e = encoder.encode(interaction)
        if hindsight:
            out.append((e.teacher_input_ids, e.teacher_prompt_len))
        else:
            out.append((e.student_input_ids, e.student_prompt_len))
    return out


def build_model(tokenizer) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **ARCH)
    torch.manual_seed(SEED)
    return transformers.Qwen3ForCausalLM(config)


def train(model, data: list[tuple[list[int], int]], pad: int, log) -> None:
    """Next-token cross-entropy on the reply tokens (end-of-turn included), AdamW, cosine schedule."""
    batch_size, steps = TRAIN["batch_size"], len(data) // TRAIN["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.98),
                                  weight_decay=TRAIN["weight_decay"])
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, TRAIN["warmup"], steps)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = data[step * batch_size:(step + 1) * batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([[-100] * n + x[n:] + [-100] * (width - len(x)) for x, n in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    model.eval()


def measure(model, tokenizer) -> dict[str, float]:
    """Preferred-style (no emoji) rates of sampled replies to held-out requests, without and with hindsight."""
    rng = random.Random(SEED + 1)
    histories = held_out_histories()
    subjects = style_subjects(held_out=True)
    rates = {}
    for name, kind in (("no hindsight", None), ("hindsight: emoji complaint", "emoji_complaint"),
                       ("hindsight: unrelated follow-up", "topic_change"),
                       ("hindsight: asks for emojis", "emoji_request")):
        prompts = []
        for history in histories:
            followup = None
            if kind is not None:
                followup = style_followup(kind, rng, subjects, random_request(rng, subjects))
            prompts.append(prompt_ids(tokenizer, history, followup))
        rates[name] = preferred_style_rate(sample_replies(model, tokenizer, prompts, seed=SEED))
    return rates


CARD = """# tiny_model: a tiny Qwen3 that can use hindsight

Made by `python scripts/make_tiny_model.py` (seed {seed}; CPU, one thread, deterministic algorithms; about 8 minutes
on 2 cores; reruns give byte-identical files). Everything it learned is synthetic: no outside data or weights.

- Architecture: Qwen3ForCausalLM, {params:,} parameters, {arch}.
- Tokenizer: byte-level BPE, {vocab} ids, trained on the synthetic conversations; Qwen3-like ChatML chat template
  (`<|im_start|>`/`<|im_end|>`, empty `<think></think>` block when `enable_thinking=False`).
- Data (`sdpo_fast.data.synthetic`): {examples:,} single-turn conversations. Requests ("tell me about X", "tips
  for Y") answered in a random style: emojis after each sentence or none, long or short, formal or casual.
  Half are plain prompts with a random reply style; half are the trainer's teacher prompts (`encode_interaction`,
  hindsight block with the next user message) whose reply grants the follow-up's wish: a complaint about
  emojis gives a reply without emojis, a request for emojis one with them, a topic change a random style.
- Training: next-token cross-entropy on reply tokens, {train}.

Preferred-style rate (share of replies without emojis), {n} sampled replies (temperature 1) to requests whose
subjects the bundled sample (`tiny_sample.jsonl`) never mentions:

| prompt | no-emoji rate |
|---|---|
{rates}

SDPO on `tiny_sample.jsonl` (users who dislike emojis) distills the hindsight behaviour into the weights:
`sdpo-fast train` with no --model/--data runs it and reports the no-hindsight rate before and after.
"""


def write_outputs(out: Path, model, tokenizer, card: str, sample_rows: list[dict]) -> None:
    """Replace out/tiny_model/ and out/tiny_sample.jsonl atomically (temp dir, then renames)."""
    target = out / "tiny_model"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tiny_model."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; the package data must be readable by all
        for path in tmp.iterdir():
            path.chmod(0o644)
        old = out / f".tiny_model.old.{os.getpid()}"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_jsonl(sample_rows, out / "tiny_sample.jsonl")


def digest(out: Path) -> dict[str, str]:
    files = sorted((out / "tiny_model").iterdir()) + [out / "tiny_sample.jsonl"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=TRAIN["examples"], help="training conversations")
    parser.add_argument("--output-dir", type=Path, default=ASSETS, help="where tiny_model/ and tiny_sample.jsonl go")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    TRAIN["examples"] = args.examples
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rng = random.Random(SEED)
    examples = [make_example(rng, rng.random() < TRAIN["hindsight_share"]) for _ in range(TRAIN["examples"])]
    tokenizer = train_tokenizer([tokenizer_text(i) for i, _ in examples[:4000]])
    data = encode_examples(tokenizer, examples)
    log(f"{len(data)} examples, mean length {sum(len(x) for x, _ in data) / len(data):.0f} tokens, "
        f"vocab {len(tokenizer)}")
    model = build_model(tokenizer)
    train(model, data, tokenizer.pad_token_id, log)
    rates = measure(model, tokenizer)
    for name, rate in rates.items():
        log(f"no-emoji rate, {name}: {rate:.0%}")
    log(f"trained and measured in {(time.perf_counter() - start) / 60:.1f} min")
    params = sum(p.numel() for p in model.parameters())
    card = CARD.format(seed=SEED, params=params, arch=", ".join(f"{k} {v}" for k, v in ARCH.items()),
                       vocab=len(tokenizer), examples=TRAIN["examples"],
                       train=", ".join(f"{k} {v}" for k, v in TRAIN.items() if k != "examples"),
                       n=len(held_out_histories()), rates="\n".join(f"| {k} | {v:.0%} |" for k, v in rates.items()))
    sample = list(generate_preference_conversations(STYLE_SAMPLE_SIZE, seed=STYLE_SAMPLE_SEED))
    write_outputs(args.output_dir, model, tokenizer, card, sample)
    for name, sha in digest(args.output_dir).items():
        print(f"{sha}  {name}")
    return 0


def tokenizer_text(interaction: Interaction) -> str:
    """Text the tokenizer is trained on: the conversation with its hindsight block, as the chat template shows it."""
    user = interaction.history[-1]["content"] + DEFAULT_HINDSIGHT_TEMPLATE.replace("{followup}", interaction.followup)
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{interaction.completion}<|im_end|>\n"


if __name__ == "__main__":
    sys.exit(main())
