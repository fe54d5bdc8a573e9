"""Logged conversations → interaction tuples → student/teacher token ids."""
from .filters import PRESETS, ConversationFilter
from .interactions import Interaction, extract_interactions
from .loading import BadRowError, BadRowLocation, InteractionStream, LoadStats, load_interactions
from .prompts import (
    DEFAULT_HINDSIGHT_TEMPLATE,
    EncodedInteraction,
    default_template_kwargs,
    InteractionEncoder,
    SkipInteraction,
    encode_interaction,
    encode_interactions,
)
from .synthetic import generate_conversations, sample_path

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
    "default_template_kwargs",
    "encode_interaction",
    "encode_interactions",
    "extract_interactions",
    "generate_conversations",
    "load_interactions",
    "sample_path",
]
