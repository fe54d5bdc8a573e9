"""Per-token scores of interactions: student and teacher log-probs and the advantage (log q - log pi) of every
completion token, as explain and evaluation read them."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import EncodedInteraction, Interaction, SkipInteraction, encode_interaction
from ..loss import sdpo_loss
from ..model import (check_encoded, check_pass_options, eval_mode, forward_micro_batch, micro_batch_indices,
                     sdpo_attention, shared_vocab_size, unwrap_model)
from ..utils.checks import check_int, check_number


@dataclass(frozen=True)
class ScoredInteraction:
    """Ids (1-D int64, both inputs end with completion_ids) and per-completion-token fp32 scores (1-D, CPU)."""

    student_input_ids: torch.Tensor
    teacher_input_ids: torch.Tensor
    completion_ids: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor




def _encode_all(tokenizer, interactions, encode_options) -> list[EncodedInteraction]:
    if not isinstance(interactions, (list, tuple)) or not interactions:
        raise ValueError("interactions must be a non-empty list of Interaction or EncodedInteraction")
    encoded = []
    for i, item in enumerate(interactions):
        if isinstance(item, EncodedInteraction):
            encoded.append(item)
        elif isinstance(item, Interaction):
            if tokenizer is None:
                raise ValueError("tokenizer is None but interactions holds Interaction objects to encode")
            try:
                encoded.append(encode_interaction(tokenizer, item, **encode_options))
            except SkipInteraction as skip:
                raise ValueError(f"interactions[{i}] cannot be encoded ({skip.reason}); filter with "
                                 "encode_interactions first") from None
        else:
            raise TypeError(f"interactions[{i}] must be an Interaction or EncodedInteraction, "
                            f"got {type(item).__name__}")
    return encoded


def score_interactions(model, tokenizer, interactions: Sequence[Interaction | EncodedInteraction], *,
                       micro_batch_tokens: int = 8192, prefix_reuse: bool = True, teacher_model=None,
                       attn_backend: str = "auto", temperature: float = 1.0,
                       **encode_options) -> list[ScoredInteraction]:
    """Per-token student/teacher log-probs and advantages (log q - log pi) of each interaction, in input order.

    Interaction objects are encoded with `encode_interaction(tokenizer, ..., **encode_options)`; one that
    cannot be encoded raises ValueError. Micro-batches hold at most `micro_batch_tokens` tokens (of the
    longer of student and teacher ids) unless a single interaction is longer. Runs in eval mode without
    grad; restores the model's modes and attention implementation afterwards.
    """
    check_int("micro_batch_tokens", micro_batch_tokens, 1)
    check_number("temperature", temperature, positive=True)
    check_pass_options(prefix_reuse, teacher_model, attn_backend, model)
    hf_model = unwrap_model(model)
    teacher_hf = hf_model if teacher_model is None else unwrap_model(teacher_model)
    encoded = check_encoded(_encode_all(tokenizer, interactions, encode_options), shared_vocab_size(hf_model, teacher_hf),
                             prefix_reuse)
    groups = micro_batch_indices(encoded, micro_batch_tokens)
    results: list[ScoredInteraction | None] = [None] * len(encoded)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for module, hf in ((model, hf_model), (teacher_model, teacher_hf)):
            if module is not None:
                stack.enter_context(eval_mode(module))
                stack.enter_context(sdpo_attention(hf))
        for group in groups:
            batch = forward_micro_batch(model, [encoded[i] for i in group], prefix_reuse=prefix_reuse,
                                        teacher_model=teacher_model, attn_backend=attn_backend)
            _, stats = sdpo_loss(batch.student_hidden, batch.lm_head_weight, batch.target_ids,
                                 teacher_hidden=batch.teacher_hidden, temperature=temperature, return_stats=True,
                                 **batch.loss_kwargs())
            counts = [len(encoded[i].completion_ids) for i in group]
            per_sequence = zip(*(s.float().cpu().split(counts) for s in stats))
            for i, (student_lp, teacher_lp, advantages) in zip(group, per_sequence):
                e = encoded[i]
                results[i] = ScoredInteraction(
                    student_input_ids=torch.tensor(e.student_input_ids, dtype=torch.long),
                    teacher_input_ids=torch.tensor(e.teacher_input_ids, dtype=torch.long),
                    completion_ids=torch.tensor(e.completion_ids, dtype=torch.long),
                    student_logprobs=student_lp,
                    teacher_logprobs=teacher_lp,
                    advantages=advantages,
                )
    return results
