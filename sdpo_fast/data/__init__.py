"""Logged conversations → interaction tuples → student/teacher token ids."""
from sdpo_fast.data.filters import PRESETS, ConversationFilter
from sdpo_fast.data.interactions import Interaction, extract_interactions
from sdpo_fast.data.loading import BadRowError, BadRowLocation, InteractionStream, LoadStats, load_interactions
from sdpo_fast.data.prompts import (
    DEFAULT_HINDSIGHT_TEMPLATE,
    EncodedInteraction,
    InteractionEncoder,
    SkipInteraction,
    encode_interaction,
    encode_interactions,
)
from sdpo_fast.data.synthetic import generate_conversations, sample_path

__all__ = [
    "DEFAULT_HINDSIGHT_TEMPLATE",
    "PRESETS",
    "BadRowError",
    "BadRowLocation",
    "ConversationFilter",
    "EncodedInteraction",
    "Interaction",
    "InteractionEncoder",
    "InteractionStream",
    "LoadStats",
    "SkipInteraction",
    "encode_interaction",
    "encode_interactions",
    "extract_interactions",
    "generate_conversations",
    "load_interactions",
    "sample_path",
]
