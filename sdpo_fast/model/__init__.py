"""Model integration: packed student/teacher passes with prefix K/V reuse on any transformers decoder that uses
AttentionInterface, and Hugging Face helpers."""
from .attention import ATTN_IMPLEMENTATION, enable_sdpo_attention, sdpo_attention, varlen_attention
from .generation import Sample, chat_prompt_ids, generate_batch, sample_batch
from .hf import apply_liger_kernels, checkpoint_layers_of, enable_checkpointing, eval_mode, unwrap_model
from .offload import OffloadedInputs
from .inputs import EncodedInteraction
from .packing import pack, plan_micro_batches
from .passes import (
    SDPOBatch,
    check_encoded,
    check_pass_options,
    forward_micro_batch,
    micro_batch_indices,
    new_prefix_cache,
    shared_vocab_size,
    student_hidden_states,
    teacher_hidden_states,
)
from .prefix_cache import PrefixKVCache
from .support import check_model_name, check_model_support, logit_head

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EncodedInteraction",
    "OffloadedInputs",
    "PrefixKVCache",
    "SDPOBatch",
    "Sample",
    "apply_liger_kernels",
    "chat_prompt_ids",
    "checkpoint_layers_of",
    "check_encoded",
    "check_model_name",
    "check_model_support",
    "check_pass_options",
    "enable_checkpointing",
    "enable_sdpo_attention",
    "eval_mode",
    "forward_micro_batch",
    "generate_batch",
    "logit_head",
    "micro_batch_indices",
    "new_prefix_cache",
    "pack",
    "plan_micro_batches",
    "sample_batch",
    "sdpo_attention",
    "shared_vocab_size",
    "student_hidden_states",
    "teacher_hidden_states",
    "unwrap_model",
    "varlen_attention",
]
