"""The CPU demo's claims on the bundled tiny model (fixed seeds, one thread): the win rate against the base model
rises to >= 80 % within 100 interactions, and after the preference flips the opposite preference wins."""
from __future__ import annotations

import csv

import pytest

from sdpo_fast.cli import main

pytestmark = pytest.mark.slow


def _win_rates(path) -> dict[tuple[int, str], float]:
    with open(path) as f:
        return {(int(r["interactions"]), r["eval_persona"]): float(r["win_rate"]) for r in csv.DictReader(f)}


def test_demo_learns_the_hidden_preference(tmp_path):
    assert main(["demo", "--interactions", "100", "--eval-every", "100", "--output-dir", str(tmp_path)]) == 0
    rates = _win_rates(tmp_path / "win_rate_curve.csv")
    assert 0.25 <= rates[0, "no-emojis"] <= 0.75  # trained = base at the start: only sampling noise
    assert rates[100, "no-emojis"] >= 0.8


def test_demo_preference_flip_reverses(tmp_path):
    assert main(["demo", "--flip", "--eval-every", "100", "--output-dir", str(tmp_path)]) == 0
    rates = _win_rates(tmp_path / "preference_flip.csv")  # 100 interactions brief, then 200 fuller
    assert 0.25 <= rates[0, "brief"] <= 0.75
    assert rates[100, "brief"] >= 0.7
    assert rates[300, "fuller"] >= 0.8 and rates[300, "brief"] <= 0.2
