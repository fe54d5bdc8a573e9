"""The student and teacher passes over packed micro-batches, and per-token scoring of interactions.

Student pass: student ids packed into one row, with grad; each layer keeps its shared-prefix K/V.
Teacher pass (no grad): only the teacher suffixes (ids after the shared prefix), attending to the kept
prefix K/V; exact when the teacher is the student's current weights. A full teacher pass (no reuse)
serves other teacher models and checks. Only the trunk runs: hidden states at completion positions are
returned for `sdpo_loss`, never full logits.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..data.interactions import Interaction
from ..data.prompts import EncodedInteraction, SkipInteraction, encode_interaction
from ..loss import sdpo_loss
from .attention import check_backend, enable_sdpo_attention, make_call, packed_forward, sdpo_attention
from .packing import PackedRow, gather_index, pack, plan_micro_batches
from .prefix_cache import PrefixKVCache


@dataclass(frozen=True)
class SDPOBatch:
    """What `sdpo_loss` needs for one micro-batch; N = total completion tokens, d = hidden size.

    student_hidden (N, d) with grad; teacher_hidden (N, d_t) detached, or None without a teacher pass;
    target_ids, sequence_index (which interaction of the micro-batch) and position_in_completion (N,) int64;
    lm_head_weight (V, d); teacher_lm_head_weight (V, d_t), or None when the teacher is the model itself.
    """

    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor | None
    target_ids: torch.Tensor
    sequence_index: torch.Tensor
    position_in_completion: torch.Tensor
    lm_head_weight: torch.Tensor
    teacher_lm_head_weight: torch.Tensor | None


@dataclass(frozen=True)
class ScoredInteraction:
    """Ids (1-D int64, both inputs end with completion_ids) and per-completion-token fp32 scores (1-D, CPU)."""

    student_input_ids: torch.Tensor
    teacher_input_ids: torch.Tensor
    completion_ids: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor


def unwrap_model(model) -> PreTrainedModel:
    """The transformers causal LM inside `model` (itself, or a peft model's base model)."""
    base = model
    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        base = model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel or a peft model, got {type(model).__name__}")
    if base.get_output_embeddings() is None:
        raise TypeError(f"model {type(base).__name__} has no output embeddings (lm_head); pass a causal LM")
    return base


def apply_liger_kernels(model) -> bool:
    """Patch `model` in place with Liger-Kernel's RMSNorm/SwiGLU/RoPE kernels where they apply (never its loss).

    Returns False, changing nothing, when liger-kernel is not installed or the model is not on CUDA.
    """
    hf_model = unwrap_model(model)
    if importlib.util.find_spec("liger_kernel") is None or hf_model.device.type != "cuda":
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=hf_model, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def reuse_lengths(encoded: Sequence[EncodedInteraction]) -> list[int]:
    """Teacher tokens taken from the student's prefix K/V: the shared prefix, short of the teacher prompt's
    last token (whose hidden state predicts the first completion token)."""
    return [min(e.shared_prefix_len, e.teacher_prompt_len - 1) for e in encoded]


def _check_pass_options(prefix_reuse: bool, teacher_model, attn_backend: str) -> None:
    if prefix_reuse and teacher_model is not None:
        raise ValueError("prefix_reuse=True needs the live teacher: pass teacher_model=None or prefix_reuse=False")
    check_backend(attn_backend)


def _check_encoded(encoded, vocab_size: int, prefix_reuse: bool) -> list[EncodedInteraction]:
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
    return list(encoded)


def _vocab_size(*models: PreTrainedModel) -> int:
    return min(m.get_input_embeddings().num_embeddings for m in models)


def _trunk_hidden(hf_model: PreTrainedModel, row: PackedRow, call) -> torch.Tensor:
    with packed_forward():
        out = hf_model.get_decoder()(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False,
                                     sdpo_call=call)
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
                        teacher_model=None, attn_backend: str = "auto", teacher: bool = True) -> SDPOBatch:
    """Student pass (grad as the caller's mode allows), then teacher pass (no grad), over one micro-batch.

    teacher False: the student pass only (teacher_hidden None), e.g. for an SFT loss.

    prefix_reuse: the teacher reuses the student's shared-prefix K/V (needs the live teacher, i.e.
    teacher_model None). teacher_model: another causal LM (or peft model) over the same token ids, run as a
    full teacher pass. Leaves `model` (and `teacher_model`) switched to the `sdpo_varlen` attention, which
    gradient-checkpoint recomputation during backward relies on; outside these passes it attends like sdpa.
    """
    _check_pass_options(prefix_reuse, teacher_model, attn_backend)
    hf_model = unwrap_model(model)
    teacher_hf = hf_model if teacher_model is None else unwrap_model(teacher_model)
    encoded = _check_encoded(encoded, _vocab_size(hf_model, teacher_hf), prefix_reuse)
    cache = new_prefix_cache(encoded) if prefix_reuse and teacher else None
    student_hidden = student_hidden_states(hf_model, encoded, prefix_cache=cache, attn_backend=attn_backend)
    teacher_hidden = teacher_hidden_states(teacher_hf, encoded, prefix_cache=cache, attn_backend=attn_backend) \
        if teacher else None

    device = student_hidden.device
    completion_lengths = [len(e.completion_ids) for e in encoded]
    return SDPOBatch(
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        target_ids=torch.tensor([t for e in encoded for t in e.completion_ids], dtype=torch.long, device=device),
        sequence_index=torch.repeat_interleave(torch.arange(len(encoded), device=device),
                                               torch.tensor(completion_lengths, device=device)),
        position_in_completion=torch.cat([torch.arange(n, device=device) for n in completion_lengths]),
        lm_head_weight=hf_model.get_output_embeddings().weight,
        teacher_lm_head_weight=None if teacher_model is None else teacher_hf.get_output_embeddings().weight,
    )


def micro_batch_indices(encoded: Sequence[EncodedInteraction], max_tokens: int) -> list[list[int]]:
    """Indices of `encoded` grouped so each group holds at most `max_tokens` tokens, counting the longer of
    each interaction's student and teacher ids; a longer interaction is alone (see `plan_micro_batches`)."""
    return plan_micro_batches([max(len(e.student_input_ids), len(e.teacher_input_ids)) for e in encoded], max_tokens)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for `module` and its submodules inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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
    if isinstance(micro_batch_tokens, bool) or not isinstance(micro_batch_tokens, int) or micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be a positive int, got {micro_batch_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    _check_pass_options(prefix_reuse, teacher_model, attn_backend)
    hf_model = unwrap_model(model)
    teacher_hf = hf_model if teacher_model is None else unwrap_model(teacher_model)
    encoded = _check_encoded(_encode_all(tokenizer, interactions, encode_options), _vocab_size(hf_model, teacher_hf),
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
                                 teacher_hidden=batch.teacher_hidden,
                                 teacher_lm_head_weight=batch.teacher_lm_head_weight, temperature=temperature,
                                 return_stats=True)
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
