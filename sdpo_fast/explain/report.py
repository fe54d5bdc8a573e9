"""Scored interactions → per-interaction summaries, and the advantage → colour mapping shared by renderers.

Colour mapping (HTML and terminal): with scale s = the 95th percentile (nearest rank) of |A| over every
token of the report (1.0 when that is 0), intensity t = min(|A| / s, 1); the background is white
(255, 255, 255) blended linearly toward BLUE for A > 0 or RED for A < 0: channel = round(255 + t·(c − 255)).
Text turns white when t > TEXT_FLIP, for contrast.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ..data import Interaction, InteractionEncoder, SkipInteraction
from ..utils.checks import check_int
from .scoring import ScoredInteraction, score_interactions

BLUE = (33, 102, 172)
RED = (178, 24, 43)
TEXT_FLIP = 0.6
SCALE_PERCENTILE = 95
SORTS = ("signal", "order")
TOP_TOKENS = 3


@dataclass(frozen=True)
class TokenScore:
    """One completion token: its id, text (decoded alone), log π (student), log q (teacher), A = log q − log π."""

    token_id: int
    text: str
    student_logprob: float
    teacher_logprob: float
    advantage: float


@dataclass(frozen=True)
class InteractionSummary:
    """One scored interaction; `index` is its position in the data, `group` its --group-by label."""

    index: int
    prompt: str
    followup: str
    meta: dict
    group: str | None
    tokens: list[TokenScore]
    mean_abs_advantage: float
    positive_share: float
    most_negative: list[TokenScore]
    most_positive: list[TokenScore]


@dataclass(frozen=True)
class Report:
    """Summaries in data order, the shared colour scale, and what produced them."""

    interactions: list[InteractionSummary]
    scale: float
    model: str
    data: str
    group_by: str | None = None

    def groups(self, sort: str = "signal") -> list[tuple[str | None, list[InteractionSummary]]]:
        """(label, summaries) per group (one unlabelled group without group_by), labels sorted; inside each,
        strongest mean |A| first (sort="signal") or data order (sort="order")."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}")
        ordered = sorted(self.interactions, key=signal_key) if sort == "signal" else list(self.interactions)
        labels = sorted({s.group for s in ordered}, key=lambda g: (g is None, g or ""))
        return [(label, [s for s in ordered if s.group == label]) for label in labels]

    def to_json(self) -> dict:
        """Plain JSON-ready dict of the whole report."""
        return {"model": self.model, "data": self.data, "group_by": self.group_by, "scale": self.scale,
                "scale_rule": f"p{SCALE_PERCENTILE} of |A| over all tokens",
                "interactions": [asdict(s) for s in self.interactions]}


def visible(text: str) -> str:
    """Token text with spaces, tabs and newlines shown as ␣, → and ↵ (for tokens listed out of context)."""
    return text.replace(" ", "␣").replace("\t", "→").replace("\n", "↵")


def signal_key(summary: InteractionSummary) -> tuple[float, int]:
    """Sort key: strongest mean |A| first, then data order."""
    return -summary.mean_abs_advantage, summary.index


def colour_scale(advantages: Iterable[float]) -> float:
    """The nearest-rank 95th percentile of |A| (1.0 when there are none or it is 0)."""
    values = sorted(abs(a) for a in advantages)
    if not values:
        return 1.0
    value = values[max(0, math.ceil(SCALE_PERCENTILE * len(values) / 100) - 1)]
    return value if value > 0 else 1.0


def intensity(advantage: float, scale: float) -> float:
    """t = min(|A| / scale, 1)."""
    return min(abs(advantage) / scale, 1.0)


def advantage_colour(advantage: float, scale: float) -> str:
    """Background '#rrggbb' for A (see the module docstring)."""
    t = intensity(advantage, scale)
    target = BLUE if advantage > 0 else RED
    return "#" + "".join(f"{round(255 + t * (c - 255)):02x}" for c in target)


def text_colour(advantage: float, scale: float) -> str:
    """'#ffffff' on strong backgrounds, else '#111111'."""
    return "#ffffff" if intensity(advantage, scale) > TEXT_FLIP else "#111111"


def summarize(index: int, interaction: Interaction, scored: ScoredInteraction, tokenizer,
              group_by: str | None = None) -> InteractionSummary:
    """Per-token scores (each id decoded alone), mean |A|, share of A > 0 and the top ±TOP_TOKENS tokens."""
    tokens = [TokenScore(int(i), tokenizer.decode([int(i)]), float(lp), float(lq), float(a)) for i, lp, lq, a in
              zip(scored.completion_ids.tolist(), scored.student_logprobs.tolist(),
                  scored.teacher_logprobs.tolist(), scored.advantages.tolist())]
    by_advantage = sorted(tokens, key=lambda t: t.advantage)
    users = [m["content"] for m in interaction.history if m.get("role") == "user"]
    return InteractionSummary(
        index=index,
        prompt=users[-1] if users else "",
        followup=interaction.followup,
        meta=dict(interaction.meta),
        group=None if group_by is None else str(interaction.meta.get(group_by, "(missing)")),
        tokens=tokens,
        mean_abs_advantage=sum(abs(t.advantage) for t in tokens) / len(tokens),
        positive_share=sum(t.advantage > 0 for t in tokens) / len(tokens),
        most_negative=[t for t in by_advantage[:TOP_TOKENS] if t.advantage < 0],
        most_positive=[t for t in reversed(by_advantage[-TOP_TOKENS:]) if t.advantage > 0],
    )


def build_report(interactions: Sequence[Interaction], scored: Sequence[ScoredInteraction], tokenizer, *,
                 model: str, data: str, group_by: str | None = None) -> Report:
    """A Report from interactions and their scores (same order)."""
    if len(interactions) != len(scored):
        raise ValueError(f"{len(interactions)} interactions but {len(scored)} scored")
    summaries = [summarize(i, x, s, tokenizer, group_by) for i, (x, s) in enumerate(zip(interactions, scored))]
    scale = colour_scale(t.advantage for s in summaries for t in s.tokens)
    return Report(summaries, scale, model, data, group_by)


def explain(model, tokenizer, interactions: Iterable[Interaction], *, n: int = 24, model_name: str = "model",
            data_name: str = "data", group_by: str | None = None, **score_options) -> Report:
    """Score the first `n` encodable interactions (others are skipped) and build their Report."""
    check_int("n", n, 1)
    encoder = InteractionEncoder(tokenizer)
    kept, encoded = [], []
    for interaction in interactions:
        try:
            encoded.append(encoder.encode(interaction))
        except SkipInteraction:
            continue
        kept.append(interaction)
        if len(kept) == n:
            break
    if not kept:
        raise ValueError("no interaction could be encoded from the data")
    scored = score_interactions(model, tokenizer, encoded, **score_options)
    return build_report(kept, scored, tokenizer, model=model_name, data=data_name, group_by=group_by)
