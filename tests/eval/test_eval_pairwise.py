import math

import pytest
import torch

from sdpo_fast.eval import length_controlled_win_rate, pairwise_win_rate
from sdpo_fast.eval.pairwise import alpaca_eval_lc_win_rate
from sdpo_fast.online.judge import LOSS, TIE, WIN, RuleJudge
from sdpo_fast.online.personas import get_persona


def test_pairwise_counts_both_orders_and_excludes_ties():
    persona = get_persona("no-emojis")
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    trained = ["plain", "fun \U0001F600", "plain", "plain too", "\U0001F600"]
    base = ["hi \U0001F600", "plain", "plain", "\U0001F680 go", "\U0001F600 x"]
    result = pairwise_win_rate(RuleJudge(), persona, prompts, trained, base)
    assert result["outcomes"] == [WIN, LOSS, TIE, WIN, TIE]
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 2)
    assert result["win_rate"] == pytest.approx(2 / 3) and result["se"] > 0


class FirstAlways:
    def prefer(self, persona, prompt, a, b):
        return "A"


def test_a_judge_with_position_bias_gives_ties():
    result = pairwise_win_rate(FirstAlways(), None, ["p"] * 3, ["x"] * 3, ["y"] * 3)
    assert result["ties"] == 3 and math.isnan(result["win_rate"])


def _torch_fit(outcomes, lengths_t, lengths_b, ridge=1e-3):
    y, d = [], []
    for o, t, b in zip(outcomes, lengths_t, lengths_b):
        if o != TIE:
            y.append(1.0 if o == WIN else 0.0)
            d.append(t - b)
    y, d = torch.tensor(y, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
    z = torch.tanh(d / d.std(unbiased=False))
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = params[0] + params[1] * z
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + ridge / 2 * (params ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.sigmoid(params[0]).item()


def test_length_controlled_win_rate_matches_a_logistic_fit():
    outcomes = [WIN, WIN, LOSS, WIN, TIE, LOSS, WIN, WIN, LOSS, WIN]
    lengths_t = [120, 300, 80, 250, 90, 60, 400, 100, 200, 150]
    lengths_b = [100, 100, 100, 100, 100, 100, 100, 120, 100, 160]
    lc = length_controlled_win_rate(outcomes, lengths_t, lengths_b)
    assert lc == pytest.approx(_torch_fit(outcomes, lengths_t, lengths_b), abs=1e-7)
    raw = 6 / 9
    assert lc < raw  # the trained model's wins come with longer replies
    same = length_controlled_win_rate(outcomes, [100] * 10, [100] * 10)
    assert same == pytest.approx(raw, abs=1e-3)


def test_alpaca_eval_missing_is_a_clear_error():
    try:
        import alpaca_eval  # noqa: F401
        pytest.skip("alpaca_eval is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install alpaca-eval"):
        alpaca_eval_lc_win_rate(["p"], ["a"], ["b"], "/nonexistent")
