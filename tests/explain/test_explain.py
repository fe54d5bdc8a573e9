"""`sdpo-fast explain`: summaries, colour scale, HTML structure and escaping, terminal and JSON output."""
from __future__ import annotations

import base64
import hashlib
import html.parser
import io
import json
import math
import re

import pytest
import torch
from rich.console import Console

from sdpo_fast import cli
from sdpo_fast.data import Interaction, encode_interaction, load_interactions, sample_path
from sdpo_fast.explain import (
    BLUE,
    RED,
    advantage_colour,
    build_report,
    colour_scale,
    explain,
    render_html,
    render_terminal,
    write_html,
)
from sdpo_fast.explain import ScoredInteraction
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

INJECTED = '<script>alert(1)</script><img src=x onerror="alert(2)"> & "quoted" \'single\''
VOID = {"meta", "br", "input", "img", "link", "hr", "wbr"}


def expected_colour(a: float, scale: float) -> str:
    """The documented mapping, computed independently: white blended toward blue (A>0) / red (A<0)."""
    t = min(abs(a) / scale, 1.0)
    rgb = BLUE if a > 0 else RED
    return "#%02x%02x%02x" % tuple(int(math.floor(255 - t * (255 - c) + 0.5)) for c in rgb)


def interactions() -> list[Interaction]:
    return [
        Interaction(history=[{"role": "user", "content": "Write a formal email to my boss."}],
                    completion="Hey boss! Just wanted to say hi.", followup="Please make it more formal.",
                    meta={"label": "relevant"}),
        Interaction(history=[{"role": "user", "content": f"Explain {INJECTED}"}],
                    completion=f"Sure: {INJECTED}\n  done", followup=f"Thanks {INJECTED} [bold red]x[/]",
                    meta={"label": INJECTED, INJECTED: 1}),
        Interaction(history=[{"role": "user", "content": "What is 2+2?"}], completion="4",
                    followup="Unrelated: what's the weather?", meta={"label": "unrelated"}),
    ]


def fake_scores(tokenizer, items, seed=0) -> list[ScoredInteraction]:
    """ScoredInteraction with random log-probs for the real token ids of `items` (no model)."""
    gen = torch.Generator().manual_seed(seed)
    scored = []
    for item in items:
        enc = encode_interaction(tokenizer, item)
        n = len(enc.completion_ids)
        student = -torch.rand(n, generator=gen) * 4
        teacher = -torch.rand(n, generator=gen) * 4
        scored.append(ScoredInteraction(torch.tensor(enc.student_input_ids), torch.tensor(enc.teacher_input_ids),
                                        torch.tensor(enc.completion_ids), student, teacher, teacher - student))
    return scored


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("qwen3")


@pytest.fixture(scope="module")
def report(tokenizer):
    items = interactions()
    return build_report(items, fake_scores(tokenizer, items), tokenizer, model=f"m {INJECTED}",
                        data=f"d {INJECTED}", group_by="label")


class Page(html.parser.HTMLParser):
    """Checks tags are balanced and records elements, attributes and text (entities decoded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.starts, self.text, self.errors = [], [], [], []
        self.doctype = None

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs), len(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.starts.append((tag, dict(attrs), len(self.stack)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def tags(self, name):
        return [attrs for tag, attrs, _ in self.starts if tag == name]


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def completion_spans(text: str) -> list[list[tuple[str, str]]]:
    """Per article, the (style, title) of each span in its completion block."""
    blocks = re.findall(r'<div class="completion">(.*?)</div>', text, flags=re.S)
    return [re.findall(r'<span class="tok" style="([^"]*)" title="([^"]*)">', b) for b in blocks]


def test_registered_in_cli():
    assert "sdpo_fast.cli.explain" in cli._COMMANDS


def test_summaries(report):
    assert [s.index for s in report.interactions] == [0, 1, 2]
    for s in report.interactions:
        advantages = [t.advantage for t in s.tokens]
        assert s.mean_abs_advantage == pytest.approx(sum(map(abs, advantages)) / len(advantages))
        assert s.positive_share == pytest.approx(sum(a > 0 for a in advantages) / len(advantages))
        assert all(t.advantage < 0 for t in s.most_negative) and all(t.advantage > 0 for t in s.most_positive)
        if s.most_negative:
            assert s.most_negative[0].advantage == min(advantages)
        if s.most_positive:
            assert s.most_positive[0].advantage == max(advantages)
        for t in s.tokens:
            assert t.advantage == pytest.approx(t.teacher_logprob - t.student_logprob, abs=1e-6)
    assert report.interactions[1].group == INJECTED and report.interactions[0].prompt.startswith("Write a formal")


def test_scale_is_p95_of_abs_advantage(report):
    values = [abs(t.advantage) for s in report.interactions for t in s.tokens]
    assert sum(v <= report.scale for v in values) >= 0.95 * len(values)
    assert sum(v < report.scale for v in values) < 0.95 * len(values)
    assert colour_scale([]) == 1.0 and colour_scale([0.0, 0.0]) == 1.0
    assert colour_scale(range(1, 101)) == 95


@pytest.mark.parametrize("a, scale, colour", [
    (0.0, 1.0, "#ffffff"), (2.0, 2.0, "#2166ac"), (-2.0, 2.0, "#b2182b"), (9.0, 2.0, "#2166ac"),
    (-9.0, 2.0, "#b2182b"), (0.2, 1.0, "#d3e0ee"), (-0.2, 1.0, "#f0d1d5"),
])
def test_colour_mapping(a, scale, colour):
    assert advantage_colour(a, scale) == colour == expected_colour(a, scale)


def test_html_structure_and_colours(report):
    text = render_html(report, sort="order")
    page = parse(text)
    assert page.errors == [] and page.stack == [] and page.doctype == "DOCTYPE html"
    assert [tag for tag, _, depth in page.starts if depth == 0] == ["html"]
    assert len(page.tags("head")) == len(page.tags("body")) == len(page.tags("main")) == 1
    assert len(page.tags("article")) == 3 and len(page.tags("section")) == 3
    assert not any("src" in a or "href" in a for _, a, _ in page.starts), "no external resources"
    assert [int(a["data-order"]) for a in page.tags("article")] == [1, 0, 2]  # groups by label: "<script…", "relevant", "unrelated"
    spans = completion_spans(text)
    by_index = {s.index: s for s in report.interactions}
    for article, block in zip(page.tags("article"), spans):
        tokens = by_index[int(article["data-order"])].tokens
        assert len(block) == len(tokens)
        for token, (style, title) in zip(tokens, block):
            assert f"background:{expected_colour(token.advantage, report.scale)};" in style
            title = html.unescape(title)
            assert f"log π {token.student_logprob:.4f}" in title and f"log q {token.teacher_logprob:.4f}" in title
            assert f"A {token.advantage:+.4f}" in title and repr(token.text) in title
    legend = "".join(page.text)
    assert f"Scale clipped at |A| = {report.scale:.3f}, the 95th percentile of |A|" in legend


def test_html_sort_by_signal(tokenizer):
    items = [Interaction([{"role": "user", "content": f"q{i}"}], f"answer number {i}", "more") for i in range(4)]
    scored = fake_scores(tokenizer, items)
    for s, k in zip(scored, [1.0, 3.0, 0.5, 2.0]):
        s.advantages.mul_(0).add_(k)
    order = [int(a["data-order"]) for a in parse(render_html(build_report(
        items, scored, tokenizer, model="m", data="d"))).tags("article")]
    assert order == [1, 3, 0, 2]


def test_injected_markup_is_escaped(report):
    text = render_html(report)
    page = parse(text)
    assert len(page.tags("script")) == 1 and not page.tags("img")
    assert not any(k.startswith("on") for _, attrs, _ in page.starts for k in attrs)
    assert "<script>alert" not in text and "<img" not in text
    shown = "".join(page.text)
    assert INJECTED in shown and f"Thanks {INJECTED}" in shown and f"m {INJECTED}" in shown
    # The single script is the one the Content-Security-Policy allows by hash.
    script = re.search(r"<script>(.*?)</script>", text, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = next(m["content"] for m in page.tags("meta") if m.get("http-equiv") == "Content-Security-Policy")
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp


def test_write_html_is_atomic(report, tmp_path):
    path = write_html(report, tmp_path / "report.html")
    assert path.read_text(encoding="utf-8") == render_html(report)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(FileNotFoundError):
        write_html(report, tmp_path / "missing" / "r.html")


def test_json_round_trip(report):
    data = json.loads(json.dumps(report.to_json()))
    assert data["scale"] == report.scale and data["group_by"] == "label"
    first = data["interactions"][1]
    assert first["followup"].startswith("Thanks <script>") and first["tokens"][0].keys() == {
        "token_id", "text", "student_logprob", "teacher_logprob", "advantage"}


@pytest.fixture(scope="module")
def tiny_report():
    tokenizer = tiny_tokenizer("qwen3")
    model = tiny_causal_lm("qwen3", vocab_size=len(tokenizer), initializer_range=0.2)
    stream = list(load_interactions(sample_path())) + interactions()[1:2]
    return explain(model, tokenizer, stream[:2] + stream[-1:], n=3, model_name="tiny", data_name="sample")


def test_terminal_rendering_on_tiny_model(tiny_report):
    console = Console(file=io.StringIO(), record=True, width=100, color_system="truecolor")
    render_terminal(tiny_report, console)
    plain = console.export_text(styles=False, clear=False)
    ansi = console.export_text(styles=True)
    assert plain.count("mean |A|") == 3 and "[bold red]x[/]" in plain  # user text is not rich markup
    assert tiny_report.interactions[0].followup[:40] in plain.replace("\n", " ").replace("│", "")
    strongest = max((t for s in tiny_report.interactions for t in s.tokens), key=lambda t: abs(t.advantage))
    rgb = tuple(int(expected_colour(strongest.advantage, tiny_report.scale)[i:i + 2], 16) for i in (1, 3, 5))
    assert "48;2;%d;%d;%d" % rgb in ansi


def test_cli_json_and_html(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli.main(["explain", "--n", "2", "--json", "--out", str(out), "--group-by", "language"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["interactions"]) == 2 and data["interactions"][0]["meta"]["language"] == "English"
    assert data["model"] == "bundled tiny Qwen3 (sdpo_fast/assets/tiny_model)" and all(s["tokens"] for s in data["interactions"])
    assert parse(out.read_text(encoding="utf-8")).errors == []


def test_cli_rejects_bad_n(capsys):
    assert cli.main(["explain", "--n", "0", "--json"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_cli_loads_local_model_dir(tmp_path, capsys):
    tokenizer = tiny_tokenizer("qwen3")
    tiny_causal_lm("qwen3", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert cli.main(["explain", "--model", str(tmp_path / "m"), "--n", "1", "--json", "--sort", "order"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(tmp_path / "m") and len(data["interactions"]) == 1
