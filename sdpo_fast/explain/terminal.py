"""A rich rendering of a Report: one panel per interaction, tokens on the report's colour scale.

Data go into rich Text objects as plain strings, never parsed as markup, with control characters (ESC, so no
escape/OSC sequence reaches the terminal, and every other C0/C1 character but newline and tab) removed."""
from __future__ import annotations

import re

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from .report import SCALE_PERCENTILE, Report, TokenScore, advantage_colour, text_colour, visible

_PREVIEW_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(text: str) -> str:
    """`text` without terminal control characters (C0 but newline and tab, DEL, C1)."""
    return _CONTROL.sub("", str(text))


def _style(token: TokenScore, scale: float) -> str:
    return f"{text_colour(token.advantage, scale)} on {advantage_colour(token.advantage, scale)}"


def _preview(text: str) -> str:
    text = safe_text(text)
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…"


def _top(label: str, tokens: list[TokenScore], scale: float) -> Text:
    line = Text(f"{label}: ", style="bold")
    for i, token in enumerate(tokens):
        line.append(", " if i else "")
        line.append(safe_text(visible(token.text)), style=_style(token, scale))
        line.append(f" ({token.advantage:+.3f})")
    if not tokens:
        line.append("none")
    return line


def render_terminal(report: Report, console: Console | None = None, sort: str = "signal") -> None:
    """Print the report to `console` (a new Console on stdout by default)."""
    console = console or Console()
    legend = Text("A = log q − log π  ")
    legend.append(f"{-report.scale:+.3f} ")
    for i in range(11):
        legend.append("  ", style=f"on {advantage_colour(report.scale * (i / 5 - 1), report.scale)}")
    legend.append(f" {report.scale:+.3f}  (red: less likely with the follow-up, blue: more; "
                  f"clipped at the p{SCALE_PERCENTILE} of |A|)")
    console.print(Text(safe_text(f"model: {report.model}  data: {report.data}  "
                                 f"{len(report.interactions)} interactions")))
    console.print(legend)
    for label, summaries in report.groups(sort):
        if label is not None:
            console.rule(Text(safe_text(f"{report.group_by} = {label} ({len(summaries)})")))
        for s in summaries:
            completion = Text()
            for token in s.tokens:
                completion.append(safe_text(token.text), style=_style(token, report.scale))
            body = Group(
                Text.assemble(("Prompt: ", "bold"), _preview(s.prompt)),
                Text.assemble(("Follow-up: ", "bold"), _preview(s.followup)),
                _top("most negative", s.most_negative, report.scale),
                _top("most positive", s.most_positive, report.scale),
                completion,
            )
            title = Text(f"#{s.index} · mean |A| {s.mean_abs_advantage:.3f} · {s.positive_share:.0%} positive")
            console.print(Panel(body, title=title, title_align="left"))
