"""`sdpo_loss` inside a `transformers.Trainer` subclass's compute_loss, on a tiny random model (CPU, seconds).

    python examples/hf_trainer_compute_loss.py [--steps 3]

The student is the model on the logged prompt; the teacher is the same model, without grad, on the prompt
with the hindsight block (the user's follow-up). Only hidden states go to `sdpo_loss`, which forms the
lm_head logits chunk by chunk: no (batch, seq, vocab) logits tensor. `sdpo-fast train` adds packing, prefix
reuse, exact accumulation and resumable checkpoints on top of the same loss.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from sdpo_fast import sdpo_loss
from sdpo_fast.data import encode_interactions, load_interactions, sample_path
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

IGNORE_FIRST_K = 2


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded student and teacher ids (B, S) / (B, T) with masks, and completion ids (B, C) (-100 pad)."""
    def pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    batch = {}
    for who in ("student", "teacher"):
        ids = [f[f"{who}_input_ids"] for f in features]
        batch[f"{who}_input_ids"] = pad(ids, 0)
        batch[f"{who}_attention_mask"] = pad([[1] * len(r) for r in ids], 0)
        batch[f"{who}_prompt_len"] = torch.tensor([len(r) - len(f["completion_ids"]) for r, f in zip(ids, features)])
    batch["completion_ids"] = pad([f["completion_ids"] for f in features], -100)
    return batch


def completion_hidden(model, input_ids, attention_mask, prompt_len, width) -> torch.Tensor:
    """(B, width, d): the final hidden states that predict each completion token."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    index = (prompt_len[:, None] - 1 + torch.arange(width)).clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


class SDPOTrainer(Trainer):
    """Trainer whose loss is SDPO: per token -A_t log pi(y_t), mean per interaction, then over the batch."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["completion_ids"].clone()
        targets[:, :IGNORE_FIRST_K] = -100
        width = targets.shape[1]
        student = completion_hidden(model, inputs["student_input_ids"], inputs["student_attention_mask"],
                                    inputs["student_prompt_len"], width)
        with torch.no_grad():
            teacher = completion_hidden(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"],
                                        inputs["teacher_prompt_len"], width)
        loss_tokens = (targets != -100).sum(1, keepdim=True)
        weights = (targets != -100) / (loss_tokens.clamp(min=1) * targets.shape[0])
        loss = sdpo_loss(student, model.get_output_embeddings().weight, targets, teacher_hidden=teacher,
                         token_weights=weights.to(student.dtype))
        return (loss, None) if return_outputs else loss


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = tiny_tokenizer("qwen3")
    model = tiny_causal_lm("qwen3", initializer_range=0.2).train()
    encoded, _ = encode_interactions(tokenizer, load_interactions(sample_path()))
    dataset = [vars(e) for e in encoded]
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=1e-4,
            logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
            disable_tqdm=True)
        trainer = SDPOTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate)
        result = trainer.train()
    print(f"{result.global_step} SDPO steps, mean training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
