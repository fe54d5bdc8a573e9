"""Pairwise judging of a trained model's replies against the base model's, given a persona.

Each pair is judged in both orders (trained as A, then as B); if the two verdicts disagree the pair is a tie.
Win rate = wins / (wins + losses) (ties excluded), with a bootstrap standard error over pairs.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Protocol

from .personas import RULES, Persona
from .users import ChatBackend, EndpointError

WIN, LOSS, TIE = "win", "loss", "tie"
JUDGE_INSTRUCTIONS = (
    "You judge which of two assistant replies a specific user would prefer. The user's profile:\n{profile}\n\n"
    "Judge only the fit with this profile, not correctness. Answer with exactly one of: A, B, TIE."
)


class Judge(Protocol):
    def prefer(self, persona: Persona, prompt: str, reply_a: str, reply_b: str) -> str:
        """'A', 'B' or 'tie': which reply the persona prefers."""


class RuleJudge:
    """Prefers the reply that satisfies more of the persona's rules; equal counts are a tie."""

    def prefer(self, persona: Persona, prompt: str, reply_a: str, reply_b: str) -> str:
        if not persona.rules:
            raise ValueError(f"persona {persona.name!r} has no rules; a rule-based judge needs at least one")
        score_a = sum(RULES[r].check(reply_a) for r in persona.rules)
        score_b = sum(RULES[r].check(reply_b) for r in persona.rules)
        return "A" if score_a > score_b else "B" if score_b > score_a else "tie"


_VERDICT = re.compile(r"\b(A|B|TIE)\b", re.IGNORECASE)


class LLMJudge:
    """An LLM judge through a `ChatBackend`; an answer naming none of A, B, TIE counts as a tie."""

    def __init__(self, backend: ChatBackend):
        self.backend = backend

    def prefer(self, persona: Persona, prompt: str, reply_a: str, reply_b: str) -> str:
        chat = [{"role": "system", "content": JUDGE_INSTRUCTIONS.format(profile=persona.description)},
                {"role": "user", "content": f"User request:\n{prompt}\n\nReply A:\n{reply_a}\n\nReply B:\n{reply_b}"
                                            "\n\nWhich reply does this user prefer? Answer A, B or TIE."}]
        match = _VERDICT.search(self.backend.complete(chat))
        if match is None:
            return "tie"
        verdict = match.group(1).upper()
        return "tie" if verdict == "TIE" else verdict


def judge_pair(judge: Judge, persona: Persona, prompt: str, trained: str, base: str) -> str:
    """WIN, LOSS or TIE for `trained` against `base`, judged in both orders (disagreement = TIE)."""
    first = {"A": WIN, "B": LOSS}.get(judge.prefer(persona, prompt, trained, base), TIE)
    second = {"A": LOSS, "B": WIN}.get(judge.prefer(persona, prompt, base, trained), TIE)
    return first if first == second else TIE


@dataclass(frozen=True)
class WinRate:
    """wins / (wins + losses), NaN when every pair is a tie; se: bootstrap standard error (NaN likewise)."""

    win_rate: float
    se: float
    wins: int
    losses: int
    ties: int


def win_rate(outcomes: list[str]) -> float:
    """Wins over decided pairs (ties excluded); NaN when none is decided."""
    wins, losses = outcomes.count(WIN), outcomes.count(LOSS)
    return wins / (wins + losses) if wins + losses else math.nan


def bootstrap_se(outcomes: list[str], n_boot: int = 1000, seed: int = 0) -> float:
    """Standard deviation of `win_rate` over `n_boot` resamples (with replacement) of the pairs; resamples with
    no decided pair are left out. NaN for fewer than 2 decided pairs."""
    if sum(o != TIE for o in outcomes) < 2:
        return math.nan
    rng = random.Random(seed)
    rates = [r for r in (win_rate(rng.choices(outcomes, k=len(outcomes))) for _ in range(n_boot)) if r == r]
    mean = sum(rates) / len(rates)
    return math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1))


def summarize(outcomes: list[str], n_boot: int = 1000, seed: int = 0) -> WinRate:
    """Win rate, bootstrap SE and counts of `outcomes` (WIN/LOSS/TIE strings)."""
    bad = sorted(set(outcomes) - {WIN, LOSS, TIE})
    if bad:
        raise ValueError(f"outcomes must be {WIN!r}, {LOSS!r} or {TIE!r}, got {bad}")
    return WinRate(win_rate(outcomes), bootstrap_se(outcomes, n_boot, seed), outcomes.count(WIN),
                   outcomes.count(LOSS), outcomes.count(TIE))


def judge_all(judge: Judge, persona: Persona, prompts: list[str], trained: list[str], base: list[str]) -> list[str]:
    """`judge_pair` over aligned lists; an unreachable LLM judge raises EndpointError naming the pair."""
    if not len(prompts) == len(trained) == len(base):
        raise ValueError(f"prompts, trained and base must have equal lengths, got "
                         f"{len(prompts)}, {len(trained)}, {len(base)}")
    outcomes = []
    for i, (p, t, b) in enumerate(zip(prompts, trained, base)):
        try:
            outcomes.append(judge_pair(judge, persona, p, t, b))
        except EndpointError as exc:
            raise EndpointError(f"judging pair {i} of {len(prompts)}: {exc}") from None
    return outcomes
