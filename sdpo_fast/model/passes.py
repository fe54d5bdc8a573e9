"""The student and teacher passes over packed micro-batches.

Student pass: student ids packed into one row, with grad; each layer keeps its shared-prefix K/V.
Teacher pass (no grad): only the teacher suffixes (ids after the shared prefix), attending to the kept
prefix K/V, which are freed right after it; exact when the teacher is the student's current weights. A full
teacher pass (no reuse) serves other teacher models and checks. Only the trunk runs: hidden states at completion positions are
returned for `sdpo_loss`, never full logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from ..loss.objectives.base import LossInputs
from ..utils.device import upload
from .attention import check_backend, enable_sdpo_attention, make_call, packed_forward
from .hf import unwrap_model
from .inputs import EncodedInteraction
from .packing import PackedRow, gather_index, pack, plan_micro_batches
from .prefix_cache import PrefixKVCache
from .support import logit_head


SDPOBatch = LossInputs
"""What the passes return for one micro-batch: `LossInputs` (loss/objectives/base.py) with position_in_completion
set and token_weights None (the training step weighs the tokens); teacher_hidden None without a teacher pass;
teacher_lm_head_weight and teacher_head None when the teacher is the model itself."""


def reuse_lengths(encoded: Sequence[EncodedInteraction]) -> list[int]:
    """Teacher tokens taken from the student's prefix K/V: the shared prefix, short of the teacher prompt's
    last token (whose hidden state predicts the first completion token)."""
    return [min(e.shared_prefix_len, e.teacher_prompt_len - 1) for e in encoded]


def check_pass_options(prefix_reuse: bool, teacher_model, attn_backend: str, model=None) -> None:
    """ValueError for options that cannot run; with `model`, also an attention backend its device refuses
    (before any forward; the dtype is checked on the first layer's q, the compute dtype under autocast or
    FSDP2 mixed precision)."""
    if prefix_reuse and teacher_model is not None:
        raise ValueError("prefix_reuse=True needs the live teacher: pass teacher_model=None or prefix_reuse=False")
    check_backend(attn_backend, None if model is None else unwrap_model(model).get_input_embeddings().weight.device)


def check_encoded(encoded, vocab_size: int, prefix_reuse: bool) -> list[EncodedInteraction]:
    if not isinstance(encoded, (list, tuple)) or not encoded:
        raise ValueError("encoded must be a non-empty list of EncodedInteraction")
    for i, e in enumerate(encoded):
        if not isinstance(e, EncodedInteraction):
            raise TypeError(f"encoded[{i}] must be an EncodedInteraction, got {type(e).__name__}")
        n = len(e.completion_ids)
        if n == 0 or e.student_prompt_len < 1 or e.teacher_prompt_len < 1:
            raise ValueError(f"encoded[{i}] needs a non-empty completion and non-empty student and teacher prompts")
        if e.student_input_ids[-n:] != e.completion_ids or e.teacher_input_ids[-n:] != e.completion_ids:
            raise ValueError(f"encoded[{i}]: student_input_ids and teacher_input_ids must end with completion_ids")
        if not 0 <= e.shared_prefix_len <= min(e.student_prompt_len, e.teacher_prompt_len):
            raise ValueError(f"encoded[{i}].shared_prefix_len={e.shared_prefix_len} exceeds a prompt length")
        if prefix_reuse and e.student_input_ids[:e.shared_prefix_len] != e.teacher_input_ids[:e.shared_prefix_len]:
            raise ValueError(f"encoded[{i}]: the first shared_prefix_len student and teacher ids differ")
        ids = e.student_input_ids + e.teacher_input_ids
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"encoded[{i}] has token ids outside the model's vocabulary [0, {vocab_size})")
        if e.behavior_logprobs is not None and len(e.behavior_logprobs) != n:
            raise ValueError(f"encoded[{i}].behavior_logprobs has {len(e.behavior_logprobs)} values for {n} "
                             "completion ids")
    if len({e.behavior_logprobs is None for e in encoded}) > 1:
        raise ValueError("encoded mixes interactions with and without behavior_logprobs; importance clipping needs "
                         "them for every interaction of a micro-batch")
    return list(encoded)


def shared_vocab_size(*models: PreTrainedModel) -> int:
    return min(m.get_input_embeddings().weight.shape[0] for m in models)  # a peft adapter has no num_embeddings


def _trunk_hidden(hf_model: PreTrainedModel, row: PackedRow, call) -> torch.Tensor:
    # A 4-D mask (a zero-size view: the packed call defines the layout) makes transformers skip its mask
    # building, whose packed-sequence check reads a device value.
    layout = torch.ones((), dtype=torch.bool, device=row.input_ids.device).expand(1, 1, *row.input_ids.shape[1:] * 2)
    with packed_forward():
        out = hf_model.get_decoder()(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False,
                                     attention_mask=layout, sdpo_call=call)
    if call.attention_calls == 0:
        raise TypeError(f"{type(hf_model).__name__} did not pass the `sdpo_call` keyword to its attention layers; "
                        "packed passes need a model that forwards **kwargs to transformers' AttentionInterface")
    return out.last_hidden_state[0]


def new_prefix_cache(encoded: Sequence[EncodedInteraction]) -> PrefixKVCache:
    """An empty cache for the micro-batch `encoded`, to be filled by `student_hidden_states`."""
    return PrefixKVCache(reuse_lengths(encoded), [len(e.student_input_ids) for e in encoded])


def student_hidden_states(model, encoded: Sequence[EncodedInteraction], *,
                          prefix_cache: PrefixKVCache | None = None, attn_backend: str = "auto") -> torch.Tensor:
    """Packed student pass (switches the model to `sdpo_varlen`); fills `prefix_cache` if given.

    `encoded` is taken as valid (see `forward_micro_batch`). Returns (N, d): the final hidden state
    predicting each completion token, concatenated over `encoded`.
    """
    hf_model = unwrap_model(model)
    enable_sdpo_attention(hf_model)
    device = hf_model.get_input_embeddings().weight.device
    row = pack([e.student_input_ids for e in encoded], device=device)
    call = make_call("plain" if prefix_cache is None else "student", row.lengths, device, backend=attn_backend,
                     prefix_cache=prefix_cache)
    index = gather_index(row.starts, [e.student_prompt_len - 1 for e in encoded],
                         [len(e.completion_ids) for e in encoded], device)
    return _trunk_hidden(hf_model, row, call).index_select(0, index)


@torch.no_grad()
def teacher_hidden_states(model, encoded: Sequence[EncodedInteraction], *,
                          prefix_cache: PrefixKVCache | None = None, attn_backend: str = "auto") -> torch.Tensor:
    """Packed teacher pass without grad: suffixes over a filled `prefix_cache`, or full teacher ids if None.

    Returns (N, d) like `student_hidden_states`.
    """
    hf_model = unwrap_model(model)
    enable_sdpo_attention(hf_model)
    device = hf_model.get_input_embeddings().weight.device
    reused = [0] * len(encoded) if prefix_cache is None else list(prefix_cache.prefix_lengths)
    row = pack([e.teacher_input_ids[r:] for e, r in zip(encoded, reused)], position_offsets=reused, device=device)
    call = make_call("plain" if prefix_cache is None else "teacher", row.lengths, device, backend=attn_backend,
                     prefix_cache=prefix_cache)
    index = gather_index(row.starts, [e.teacher_prompt_len - r - 1 for e, r in zip(encoded, reused)],
                         [len(e.completion_ids) for e in encoded], device)
    return _trunk_hidden(hf_model, row, call).index_select(0, index)


def forward_micro_batch(model, encoded: Sequence[EncodedInteraction], *, prefix_reuse: bool = True,
                        teacher_model=None, attn_backend: str = "auto", teacher: bool = True) -> LossInputs:
    """Student pass (grad as the caller's mode allows), then teacher pass (no grad), over one micro-batch.

    teacher False: the student pass only (teacher_hidden None), e.g. for an SFT loss.

    prefix_reuse: the teacher reuses the student's shared-prefix K/V (needs the live teacher, i.e.
    teacher_model None). teacher_model: another causal LM (or peft model) over the same token ids, run as a
    full teacher pass. Leaves `model` (and `teacher_model`) switched to the `sdpo_varlen` attention, which
    gradient-checkpoint recomputation during backward relies on; outside these passes it attends like sdpa.
    """
    check_pass_options(prefix_reuse, teacher_model, attn_backend, model)
    hf_model = unwrap_model(model)
    teacher_hf = hf_model if teacher_model is None else unwrap_model(teacher_model)
    encoded = check_encoded(encoded, shared_vocab_size(hf_model, teacher_hf), prefix_reuse)
    cache = new_prefix_cache(encoded) if prefix_reuse and teacher else None
    student_hidden = student_hidden_states(hf_model, encoded, prefix_cache=cache, attn_backend=attn_backend)
    teacher_hidden = teacher_hidden_states(teacher_hf, encoded, prefix_cache=cache, attn_backend=attn_backend) \
        if teacher else None
    if cache is not None:  # else kept until backward ends, by the gradient-checkpointed call that holds it
        cache.release()

    device = student_hidden.device
    lengths = [len(e.completion_ids) for e in encoded]
    head = logit_head(hf_model)
    teacher_head = None if teacher_model is None else logit_head(teacher_hf)
    return LossInputs(
        student_hidden=student_hidden,
        token_weights=None,
        teacher_hidden=teacher_hidden,
        target_ids=upload([t for e in encoded for t in e.completion_ids], torch.long, device),
        sequence_index=upload([i for i, n in enumerate(lengths) for _ in range(n)], torch.long, device),
        position_in_completion=upload([k for n in lengths for k in range(n)], torch.long, device),
        lm_head_weight=head.weight,
        teacher_lm_head_weight=None if teacher_head is None else teacher_head.weight,
        behavior_logprobs=None if encoded[0].behavior_logprobs is None else
        upload([x for e in encoded for x in e.behavior_logprobs], torch.float32, device),
        head=head,
        teacher_head=teacher_head,
    )


def micro_batch_indices(encoded: Sequence[EncodedInteraction], max_tokens: int) -> list[list[int]]:
    """Indices of `encoded` grouped so each group holds at most `max_tokens` tokens, counting the longer of
    each interaction's student and teacher ids; a longer interaction is alone (see `plan_micro_batches`)."""
    return plan_micro_batches([max(len(e.student_input_ids), len(e.teacher_input_ids)) for e in encoded], max_tokens)
