"""Pairwise judged win rate of the trained model's replies against the base model's (AlpacaEval-style: both
orders, ties excluded, bootstrap standard error), through `sdpo_fast.online.judge`."""
from __future__ import annotations

import math

from ..online.judge import TIE, WIN, judge_all, summarize
from ..online.personas import Persona

GENERAL_PERSONA = Persona(
    "general", "You want the most helpful, accurate, clear and complete answer to your request.")
"""The profile an LLM judge is given when no persona is named (AlpacaEval's question: which reply is better)."""


def length_controlled_win_rate(outcomes: list[str], trained_lengths: list[int], base_lengths: list[int],
                               iters: int = 50) -> float:
    """Win rate with the length difference regressed out (AlpacaEval 2.0's idea): a logistic model
    P(win) = sigmoid(theta + phi * tanh(d / sd(d))) over decided pairs, d = trained - base length in characters;
    the result is sigmoid(theta), the predicted win rate at equal lengths. NaN with no decided pair."""
    if not len(outcomes) == len(trained_lengths) == len(base_lengths):
        raise ValueError("outcomes, trained_lengths and base_lengths must have equal lengths")
    pairs = [(1.0 if o == WIN else 0.0, t - b) for o, t, b in zip(outcomes, trained_lengths, base_lengths) if o != TIE]
    if not pairs:
        return math.nan
    mean = sum(d for _, d in pairs) / len(pairs)
    sd = math.sqrt(sum((d - mean) ** 2 for _, d in pairs) / len(pairs)) or 1.0
    data = [(y, math.tanh(d / sd)) for y, d in pairs]
    theta = phi = 0.0
    ridge = 1e-3  # keeps the fit finite when the outcomes are separable (all wins, say)
    for _ in range(iters):
        g0, g1 = -ridge * theta, -ridge * phi
        h00 = h11 = ridge
        h01 = 0.0
        for y, z in data:
            p = 1.0 / (1.0 + math.exp(-(theta + phi * z)))
            w = p * (1.0 - p)
            g0 += y - p
            g1 += (y - p) * z
            h00 += w
            h01 += w * z
            h11 += w * z * z
        det = h00 * h11 - h01 * h01
        theta += (h11 * g0 - h01 * g1) / det
        phi += (h00 * g1 - h01 * g0) / det
    return 1.0 / (1.0 + math.exp(-theta))


def pairwise_win_rate(judge, persona: Persona | None, prompts: list[str], trained: list[str], base: list[str], *,
                      length_control: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"win_rate", "se", "wins", "losses", "ties", "outcomes", "lc_win_rate" (with length_control)}: each pair
    judged in both orders (`judge_pair`; disagreement = tie). persona None: GENERAL_PERSONA."""
    outcomes = judge_all(judge, persona or GENERAL_PERSONA, prompts, trained, base)
    summary = summarize(outcomes, n_boot=n_boot, seed=seed)
    result = {"win_rate": summary.win_rate, "se": summary.se, "wins": summary.wins, "losses": summary.losses,
              "ties": summary.ties, "outcomes": outcomes}
    if length_control:
        result["lc_win_rate"] = length_controlled_win_rate(outcomes, [len(t) for t in trained], [len(b) for b in base])
    return result


def alpaca_eval_lc_win_rate(prompts: list[str], trained: list[str], base: list[str], output_dir: str,
                            annotators_config: str | None = None) -> dict:
    """The official `alpaca_eval` package's length-controlled win rate of `trained` against `base` as the
    reference (its annotator needs its API, e.g. OPENAI_API_KEY). ImportError when it is not installed."""
    try:
        from alpaca_eval import evaluate
    except ImportError:
        raise ImportError("--alpaca-eval needs the alpaca_eval package: pip install alpaca-eval "
                          "(and its annotator's API key, e.g. OPENAI_API_KEY)") from None
    model_outputs = [{"instruction": p, "output": o, "generator": "sdpo"} for p, o in zip(prompts, trained)]
    reference = [{"instruction": p, "output": o, "generator": "base"} for p, o in zip(prompts, base)]
    options = {"annotators_config": annotators_config} if annotators_config else {}
    leaderboard, _ = evaluate(model_outputs=model_outputs, reference_outputs=reference, output_path=output_dir,
                              is_return_instead_of_print=True, **options)
    row = leaderboard.loc["sdpo"] if "sdpo" in leaderboard.index else leaderboard.iloc[0]
    return {key: float(row[key]) for key in ("length_controlled_winrate", "win_rate", "standard_error") if key in row}

