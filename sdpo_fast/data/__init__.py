"""Logged conversations → interaction tuples → student/teacher token ids."""
from .filters import PAPER_WILDCHAT, PAPER_WILDFEEDBACK, PRESETS, ConversationFilter, Preprocessing
from .interactions import Interaction, extract_interactions
from .loading import BadRowError, BadRowLocation, InteractionStream, LoadStats, load_interactions
from .prompts import (
    AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE,
    DEFAULT_HINDSIGHT_TEMPLATE,
    HINDSIGHT_TEMPLATES,
    EncodedInteraction,
    default_template_kwargs,
    InteractionEncoder,
    SkipInteraction,
    encode_interaction,
    encode_interactions,
)
from .synthetic import generate_conversations, sample_path

__all__ = [
    "AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE",
    "DEFAULT_HINDSIGHT_TEMPLATE",
    "HINDSIGHT_TEMPLATES",
    "PAPER_WILDCHAT",
    "PAPER_WILDFEEDBACK",
    "PRESETS",
    "Preprocessing",
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
