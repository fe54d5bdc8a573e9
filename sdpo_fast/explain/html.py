"""A self-contained HTML report: inline CSS and one inline script (allowed by its hash in the page's CSP),
no network; every piece of data is escaped with html.escape."""
from __future__ import annotations

import base64
import hashlib
import html
import os
from pathlib import Path

from ..utils.files import write_text_atomic
from .report import SCALE_PERCENTILE, Report, TokenScore, advantage_colour, text_colour, visible

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#111;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
h1{font-size:18px;margin:0 0 4px}
h2{font-size:16px;margin:16px 16px 4px}
main{padding:0 0 24px}
.info,.controls{color:#444;margin:2px 0}
.legend{margin:4px 0}
.legend span{vertical-align:middle}
.bar{display:inline-flex}
.bar span{width:14px;height:14px}
article{background:#fff;border:1px solid #ddd;border-radius:6px;margin:8px 16px;padding:8px 12px}
article h3{font-size:14px;margin:0 0 4px}
.meta{color:#666;font-size:12px}
.text{white-space:pre-wrap;margin:4px 0;max-height:8em;overflow:auto}
.label{font-weight:600;color:#333}
.completion{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;line-height:1.7;
  border-top:1px solid #eee;padding-top:6px;margin-top:6px}
.tok{border-radius:2px}
"""

_SCRIPT = """
(function () {
  var sort = document.getElementById("sort"), min = document.getElementById("min");
  var minValue = document.getElementById("min-value"), shown = document.getElementById("shown");
  function signal(a) { return parseFloat(a.dataset.signal); }
  function order(a) { return parseInt(a.dataset.order, 10); }
  function apply() {
    var threshold = parseFloat(min.value), visible = 0, total = 0;
    document.querySelectorAll("section.group").forEach(function (group) {
      var list = group.querySelector(".items"), inGroup = 0;
      var items = Array.prototype.slice.call(list.querySelectorAll("article"));
      items.sort(function (a, b) {
        return sort.value === "signal" ? (signal(b) - signal(a)) || (order(a) - order(b)) : order(a) - order(b);
      });
      items.forEach(function (item) {
        list.appendChild(item);
        item.hidden = signal(item) < threshold;
        if (!item.hidden) { inGroup += 1; }
        total += 1;
      });
      group.hidden = inGroup === 0;
      visible += inGroup;
    });
    minValue.textContent = threshold.toFixed(3);
    shown.textContent = visible + " of " + total + " shown";
  }
  sort.addEventListener("change", apply);
  min.addEventListener("input", apply);
  apply();
})();
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"
_LEGEND_STEPS = 11


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _token(token: TokenScore, scale: float, shown: str | None = None) -> str:
    """A coloured span; `shown` replaces the token text in the span (not in its tooltip)."""
    title = (f"token: {token.text!r} (id {token.token_id})\nlog π {token.student_logprob:.4f}\n"
             f"log q {token.teacher_logprob:.4f}\nA {token.advantage:+.4f}")
    style = f"background:{advantage_colour(token.advantage, scale)};color:{text_colour(token.advantage, scale)}"
    text = token.text if shown is None else shown
    return f'<span class="tok" style="{_e(style)}" title="{_e(title)}">{_e(text)}</span>'


def _top(tokens: list[TokenScore], scale: float) -> str:
    return ", ".join(f"{_token(t, scale, visible(t.text))} ({t.advantage:+.3f})" for t in tokens) or "none"


def _article(summary, scale: float) -> str:
    meta = " · ".join(f"{_e(k)}={_e(v)}" for k, v in summary.meta.items())
    tokens = "".join(_token(t, scale) for t in summary.tokens)
    return (
        f'<article data-signal="{summary.mean_abs_advantage:.6f}" data-order="{summary.index}">'
        f"<h3>#{summary.index} · mean |A| {summary.mean_abs_advantage:.3f} · "
        f"{summary.positive_share:.0%} positive · {len(summary.tokens)} tokens</h3>"
        f'<div class="meta">{meta}</div>'
        f'<div class="text"><span class="label">Prompt:</span> {_e(summary.prompt)}</div>'
        f'<div class="text"><span class="label">Follow-up:</span> {_e(summary.followup)}</div>'
        f'<div class="info">most negative: {_top(summary.most_negative, scale)}</div>'
        f'<div class="info">most positive: {_top(summary.most_positive, scale)}</div>'
        f'<div class="completion">{tokens}</div>'
        "</article>"
    )


def _legend(scale: float) -> str:
    steps = [scale * (2 * i / (_LEGEND_STEPS - 1) - 1) for i in range(_LEGEND_STEPS)]
    bar = "".join(f'<span style="background:{advantage_colour(a, scale)}" title="A {a:+.3f}"></span>' for a in steps)
    return (f'<div class="legend">A = log q − log π: <span>{-scale:+.3f}</span><span class="bar">{bar}</span>'
            f"<span>{scale:+.3f}</span><br>red: the teacher (with the follow-up) finds the token less likely; "
            f"blue: more likely. Scale clipped at |A| = {scale:.3f}, the {SCALE_PERCENTILE}th percentile of |A| "
            "over this report.</div>")


def render_html(report: Report, sort: str = "signal") -> str:
    """The report as one HTML document; `sort` ("signal" or "order") sets the initial order."""
    groups = report.groups(sort)
    top = max((s.mean_abs_advantage for s in report.interactions), default=0.0)
    sections = []
    for label, summaries in groups:
        heading = "" if label is None else (
            f"<h2>{_e(report.group_by)} = {_e(label)} <small>({len(summaries)} interactions, mean |A| "
            f"{sum(s.mean_abs_advantage for s in summaries) / len(summaries):.3f})</small></h2>")
        items = "".join(_article(s, report.scale) for s in summaries)
        sections.append(f'<section class="group">{heading}<div class="items">{items}</div></section>')
    n_tokens = sum(len(s.tokens) for s in report.interactions)
    selected = {k: " selected" if k == sort else "" for k in ("signal", "order")}
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>SDPO explain: {_e(report.data)}</title><style>{_CSS}</style></head><body>"
        "<header><h1>SDPO token advantages</h1>"
        f'<div class="info">model: {_e(report.model)} · data: {_e(report.data)} · '
        f"{len(report.interactions)} interactions · {n_tokens} completion tokens · "
        "hover a token for log π, log q and A</div>"
        f"{_legend(report.scale)}"
        '<div class="controls"><label>sort <select id="sort">'
        f'<option value="signal"{selected["signal"]}>signal (mean |A|)</option>'
        f'<option value="order"{selected["order"]}>data order</option></select></label> '
        f'<label>min mean |A| <input id="min" type="range" min="0" max="{top:.6f}" '
        f'step="{top / 100 if top > 0 else 1:.6f}" value="0"></label> <span id="min-value">0.000</span> · '
        f'<span id="shown">{len(report.interactions)} shown</span></div></header>'
        f"<main>{''.join(sections)}</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(report: Report, path: str | os.PathLike, sort: str = "signal") -> Path:
    """Write render_html(report) to `path` atomically (temp file in the same folder, then os.replace), owner-only
    (0o600) like checkpoints: the report holds conversation text."""
    return write_text_atomic(path, render_html(report, sort), mode=0o600)
