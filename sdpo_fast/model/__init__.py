"""Packed student/teacher passes with prefix K/V reuse, on any transformers decoder using AttentionInterface."""
from .attention import ATTN_IMPLEMENTATION, enable_sdpo_attention, sdpo_attention, varlen_attention
from .packing import pack, plan_micro_batches
from .prefix_cache import PrefixKVCache
from .scoring import (
    ScoredInteraction,
    SDPOBatch,
    apply_liger_kernels,
    forward_micro_batch,
    micro_batch_indices,
    new_prefix_cache,
    score_interactions,
    student_hidden_states,
    teacher_hidden_states,
    unwrap_model,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PrefixKVCache",
    "SDPOBatch",
    "ScoredInteraction",
    "apply_liger_kernels",
    "enable_sdpo_attention",
    "forward_micro_batch",
    "micro_batch_indices",
    "new_prefix_cache",
    "pack",
    "plan_micro_batches",
    "score_interactions",
    "sdpo_attention",
    "student_hidden_states",
    "teacher_hidden_states",
    "unwrap_model",
    "varlen_attention",
]
