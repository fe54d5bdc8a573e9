"""The bundled tiny-model demo: its model and sample paths, styled conversations, style checks, reports and
settings."""
from .assets import tiny_model_path, tiny_sample_path
from .report import REPORT_PROMPTS, demo_prompts, held_out_histories, preferred_rate, prompt_ids, sample_replies
from .sample import generate_preference_conversations
from .settings import TINY_DEMO_PRESET, TINY_DEMO_TRAIN, online_demo_settings
from .style import (count_emojis, degenerate_rate, emoji_rate, formality, has_emoji, is_degenerate,
                    preferred_style_rate, word_count)
from .threads import single_thread

__all__ = ["REPORT_PROMPTS", "TINY_DEMO_PRESET", "TINY_DEMO_TRAIN", "count_emojis", "degenerate_rate", "demo_prompts", "emoji_rate",
           "formality", "generate_preference_conversations", "has_emoji", "held_out_histories", "is_degenerate", "online_demo_settings",
           "preferred_rate", "preferred_style_rate", "prompt_ids", "sample_replies", "single_thread",
           "tiny_model_path", "tiny_sample_path", "word_count"]
