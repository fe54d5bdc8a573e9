"""`explain` with hostile conversation text and bad output paths: no control sequence reaches the terminal,
report files are owner-only, and path problems end in one line before the model loads."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import torch
from rich.console import Console

from sdpo_fast.data import Interaction, encode_interaction
from sdpo_fast.explain import ScoredInteraction, build_report, render_terminal, write_html
from sdpo_fast.explain.terminal import safe_text
from sdpo_fast.testing import tiny_tokenizer

HOSTILE = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m\x00\x08tab\there\nnext\x7f line"


def _report():
    tokenizer = tiny_tokenizer("qwen3")
    item = Interaction(history=[{"role": "user", "content": f"Hi {HOSTILE}"}], completion=f"Reply {HOSTILE}",
                       followup=f"Thanks {HOSTILE}", meta={"label": HOSTILE})
    enc = encode_interaction(tokenizer, item)
    n = len(enc.completion_ids)
    student, teacher = -torch.linspace(0.1, 3, n), -torch.linspace(3, 0.1, n)
    scored = ScoredInteraction(torch.tensor(enc.student_input_ids), torch.tensor(enc.teacher_input_ids),
                               torch.tensor(enc.completion_ids), student, teacher, teacher - student)
    return build_report([item], [scored], tokenizer, model=f"m{HOSTILE}", data="d", group_by="label")


def test_safe_text_keeps_newline_and_tab_only():
    expected = "".join(c for c in HOSTILE if c in "\n\t" or not (ord(c) < 32 or 0x7f <= ord(c) <= 0x9f))
    assert safe_text(HOSTILE) == expected and "\x1b" not in expected and "tab\there\nnext" in expected


def test_terminal_output_has_no_control_sequences_from_the_text():
    console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
    render_terminal(_report(), console)
    out = console.file.getvalue()
    assert "Thanks [2J]52;c;ZXZpbA==31mtab" in out.replace("\n", "")  # visible, but inert
    for bad in ("\x1b", "\x07", "\x9b", "\x00", "\x08", "\x7f"):
        assert bad not in out


def test_html_report_is_owner_only(tmp_path):
    path = write_html(_report(), tmp_path / "r.html")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _explain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo_fast.cli", "explain", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "0"})


def test_cli_terminal_with_hostile_data(tmp_path):
    data = tmp_path / "hostile.jsonl"
    row = {"conversation": [{"role": "user", "content": f"Hello {HOSTILE}"},
                            {"role": "assistant", "content": "Sure, here it is."},
                            {"role": "user", "content": f"No emojis {HOSTILE}"}]}
    data.write_text(json.dumps(row) + "\n")
    result = _explain("--data", str(data), "--n", "1", "--terminal")
    assert result.returncode == 0, result.stderr
    assert "No emojis" in result.stdout and "\x1b" not in result.stdout and "\x07" not in result.stdout


def test_cli_path_problems_are_one_line(tmp_path):
    cases = [(["--out", str(tmp_path)], "is a directory; give a file path"),
             (["--out", str(tmp_path / "missing" / "r.html")], "does not exist; create it first"),
             (["--model", "/nonexistent"], "no such local directory")]
    for args, message in cases:
        result = _explain(*args, "--n", "1")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
