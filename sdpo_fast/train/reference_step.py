"""Pure-PyTorch reference step: plain per-interaction Hugging Face forwards with full logits, one backward.

The same loss semantics as the trainer (ignore_first_k, aggregation, temperature, signal_clip, sft), written
without packing, prefix reuse, fused losses or micro-batches: the ground truth for tests and the baseline
for benchmarks.
"""
from __future__ import annotations

import torch

from ..data import EncodedInteraction


def _completion_logprobs(model, input_ids: list[int], n: int, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the n completion tokens ending `input_ids`; (n,) fp32."""
    ids = torch.tensor([input_ids], device=model.get_input_embeddings().weight.device)
    logits = model(input_ids=ids).logits[0, -n - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0, -n:, None]).squeeze(-1)


def reference_loss(model, batch: list[EncodedInteraction], *, loss: str = "sdpo", aggregation: str = "sequence",
                   ignore_first_k: int = 2, temperature: float = 1.0, signal_clip: float | None = None,
                   center_advantages: bool = False) -> torch.Tensor:
    """The step loss over `batch` (0-dim fp32, differentiable in the model's trainable parameters).

    sdpo: per token -A_t log pi(y_t), A_t = log q(y_t | teacher ids) - log pi(y_t | student ids), detached and
    optionally mean-centred over the interaction's loss tokens (center_advantages), then clipped to
    +-signal_clip; sft: -log pi(y_t) at temperature 1. Tokens at completion positions
    < ignore_first_k are left out. sequence: mean per interaction, then mean over all interactions of the
    batch; token: mean over all loss tokens of the batch.
    """
    per_interaction, counts = [], []
    for e in batch:
        n = len(e.completion_ids)
        if loss == "sft":
            per_token = -_completion_logprobs(model, e.student_input_ids, n, 1.0)
        else:
            student = _completion_logprobs(model, e.student_input_ids, n, temperature)
            with torch.no_grad():
                teacher = _completion_logprobs(model, e.teacher_input_ids, n, temperature)
            advantage = teacher - student.detach()
            if center_advantages and n > ignore_first_k:
                advantage = advantage - advantage[ignore_first_k:].mean()
            if signal_clip is not None:
                advantage = advantage.clamp(-signal_clip, signal_clip)
            per_token = -advantage * student
        per_interaction.append(per_token[ignore_first_k:].sum())
        counts.append(max(n - ignore_first_k, 0))
    if aggregation == "sequence":
        return sum(s / c for s, c in zip(per_interaction, counts) if c) / len(batch)
    return sum(per_interaction) / sum(counts)


def reference_step(model, optimizer, scheduler, batch: list[EncodedInteraction], *,
                   max_grad_norm: float | None = None, **loss_options) -> float:
    """One optimizer step on the reference loss (one backward over the whole batch); returns the loss."""
    loss = reference_loss(model, batch, **loss_options)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
