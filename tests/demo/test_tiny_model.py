"""The bundled tiny model and sample (issue 6): style checkers, the styled generator, the model's use of hindsight,
per-token advantages, and SDPO vs SFT on the bundled default."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from sdpo_fast import cli
from sdpo_fast.demo.assets import tiny_sample_path
from sdpo_fast.data import load_interactions
from sdpo_fast.demo.sample import (
    EMOJIS, STYLE_SAMPLE_SEED, STYLE_SAMPLE_SIZE, Style, generate_preference_conversations, random_request,
    style_followup, style_subjects, styled_reply,
)
from sdpo_fast.explain import score_interactions
from sdpo_fast.demo.style import (count_emojis, emoji_rate, formality, has_emoji, is_degenerate, preferred_style_rate,
                                  word_count)
from sdpo_fast.demo.threads import single_thread
from sdpo_fast.train import load_yaml, resolve_config
from sdpo_fast.demo.report import held_out_histories, prompt_ids, sample_replies
from sdpo_fast.train.setup import load_model_and_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model_and_tokenizer(resolve_config({"device": "cpu"}))
    return model.eval(), tokenizer


def test_style_checkers_on_every_style():
    rng = random.Random(0)
    request = random_request(rng, style_subjects(held_out=False))
    for emojis in (False, True):
        for long in (False, True):
            for formal in (False, True):
                reply = styled_reply(request, Style(emojis, long, formal), rng)
                assert has_emoji(reply) is emojis
                assert (count_emojis(reply) >= (5 if long else 2)) if emojis else count_emojis(reply) == 0
                assert (word_count(reply) > 20) is long
                assert (formality(reply) > 0) is formal and (formality(reply) < 0) is (not formal)
    assert count_emojis("ok ☀️ 🙂") == 3 and not has_emoji("Ünïcödé € ß, π · r²")
    assert emoji_rate(["a 🎉", "b", "c", "d 👍"]) == 0.5 and preferred_style_rate(["a", "b 🚀"]) == 0.5
    assert is_degenerate("s s s s s so") and is_degenerate("   ") and not is_degenerate("Sure thing! Sure thing.")
    assert preferred_style_rate(["Fine answer.", "s s s s s s"]) == 0.5
    assert all(has_emoji(e) for e in EMOJIS)
    with pytest.raises(ValueError):
        emoji_rate([])


def test_bundled_sample_is_the_seeded_generator_output():
    rows = [json.loads(line) for line in tiny_sample_path().read_text(encoding="utf-8").splitlines()]
    assert rows == list(generate_preference_conversations(STYLE_SAMPLE_SIZE, seed=STYLE_SAMPLE_SEED))
    assert list(generate_preference_conversations(30, seed=5)) == list(generate_preference_conversations(30, seed=5))
    assert list(generate_preference_conversations(30, seed=5)) != list(generate_preference_conversations(30, seed=6))
    kinds = [r["kind"] for r in rows]
    assert 0.25 < kinds.count("style:topic_change") / len(rows) < 0.42  # about a third unrelated
    held_out = [s for _, s in style_subjects(held_out=True)]
    for row in rows:
        request, reply, followup = (m["content"] for m in row["conversation"])
        assert not any(s in request or s in followup for s in held_out)
        if row["kind"] != "style:topic_change":  # the shared preference: emoji replies always draw a complaint
            assert (row["kind"] == "style:emoji_complaint") is has_emoji(reply)
    assert 0.4 < sum(has_emoji(r["conversation"][1]["content"]) for r in rows) / len(rows) < 0.6
    assert len(list(load_interactions(tiny_sample_path()))) == STYLE_SAMPLE_SIZE


def _rate(model, tokenizer, followup_kind: str | None, seed: int) -> float:
    rng = random.Random(seed)
    subjects = style_subjects(held_out=True)
    prompts = []
    for history in held_out_histories(64, seed):
        followup = None
        if followup_kind is not None:
            request = random_request(rng, subjects)
            followup = style_followup(followup_kind, rng, subjects, request)
        prompts.append(prompt_ids(tokenizer, history, followup))
    return preferred_style_rate(sample_replies(model, tokenizer, prompts, seed=seed))


def test_tiny_model_follows_the_hindsight_block(tiny):
    """64 samples: a binomial rate's standard error is at most 6 points, so the margins below are >= 2 of them."""
    model, tokenizer = tiny
    assert _rate(model, tokenizer, "emoji_complaint", seed=1) >= 0.85
    assert 0.3 <= _rate(model, tokenizer, None, seed=1) <= 0.7
    assert 0.3 <= _rate(model, tokenizer, "topic_change", seed=1) <= 0.7
    assert _rate(model, tokenizer, "emoji_request", seed=1) <= 0.15


def test_advantages_are_negative_on_emojis_after_complaints_and_near_zero_after_unrelated_followups(tiny):
    model, tokenizer = tiny
    interactions = [i for i in load_interactions(tiny_sample_path()) if has_emoji(i.completion)]
    by_kind = {kind: [i for i in interactions if i.meta["kind"] == f"style:{kind}"]
               for kind in ("emoji_complaint", "topic_change")}
    assert min(map(len, by_kind.values())) >= 20
    emoji_adv, first_emoji_adv, all_adv = {}, {}, {}
    for kind, items in by_kind.items():
        scored = score_interactions(model, tokenizer, items)
        masks = [torch.tensor([has_emoji(tokenizer.decode([t])) for t in s.completion_ids.tolist()]) for s in scored]
        emoji_adv[kind] = torch.cat([s.advantages[m] for s, m in zip(scored, masks)])
        first_emoji_adv[kind] = torch.stack([s.advantages[m.nonzero()[0, 0]] for s, m in zip(scored, masks)])
        all_adv[kind] = torch.cat([s.advantages for s in scored])
    # The teacher, told that emojis annoy, would not have started writing them: strongly negative everywhere.
    assert (first_emoji_adv["emoji_complaint"] < -1.0).all() and first_emoji_adv["emoji_complaint"].mean() < -3.0
    assert emoji_adv["emoji_complaint"].mean() < -1.0
    # An unrelated follow-up changes next to nothing.
    assert emoji_adv["topic_change"].abs().mean() < 0.3 and first_emoji_adv["topic_change"].abs().mean() < 0.3
    assert all_adv["topic_change"].abs().mean() < 0.15


@pytest.mark.slow
def test_bundled_default_sdpo_learns_the_users_preference_and_sft_does_not(tmp_path, capsys):
    """`sdpo-fast train` with defaults (and with --loss sft): the printed no-hindsight rates before and after, on
    64 sampled replies each (standard error <= 6 points)."""
    rates, printed = {}, {}
    for loss in ("sdpo", "sft"):
        assert cli.main(["train", "--output-dir", str(tmp_path / loss), "--no-progress", "--loss", loss]) == 0
        printed[loss] = capsys.readouterr().out
        match = re.search(r"no hindsight: (\d+)% before -> (\d+)% after " + loss + "\n", printed[loss])
        assert match, printed[loss]
        rates[loss] = [int(g) / 100 for g in match.groups()]
    assert "bundled tiny Qwen3: 45/45 steps over 240 interactions" in printed["sdpo"]
    out = tmp_path / "sdpo"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in lines if "event" not in m]
    assert [m["step"] for m in metrics] == list(range(1, 46)) and {m["interactions"] for m in metrics} == {16}
    assert all(0 <= m["positive_advantage_share"] <= 1 and m["tokens_per_s"] > 0 for m in metrics)
    saved = load_yaml(out / "config.yaml")
    assert saved["preset"] == "tiny-demo" and resolve_config(saved) == resolve_config({"output_dir": str(out)})
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-45", "config.yaml", "config_history.jsonl",
                                                     "metrics.jsonl"]
    assert rates["sdpo"][0] == rates["sft"][0] and 0.3 <= rates["sdpo"][0] <= 0.7
    assert rates["sdpo"][1] >= 0.8
    assert rates["sft"][1] <= 0.7
