"""Token-level SDPO advantage reports: which follow-ups teach something, and on which tokens."""
from .html import render_html, write_html
from .report import (
    BLUE,
    RED,
    InteractionSummary,
    Report,
    TokenScore,
    advantage_colour,
    build_report,
    colour_scale,
    explain,
    text_colour,
)
from .scoring import ScoredInteraction, score_interactions
from .terminal import render_terminal

__all__ = [
    "BLUE",
    "RED",
    "InteractionSummary",
    "Report",
    "ScoredInteraction",
    "TokenScore",
    "advantage_colour",
    "build_report",
    "colour_scale",
    "explain",
    "render_html",
    "render_terminal",
    "score_interactions",
    "text_colour",
    "write_html",
]
