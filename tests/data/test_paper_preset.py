"""preset="paper" against the authors' preprocessing scripts (lasgroup/user_interactions, auxiliary/
preprocess_wildchat.py and preprocess_wildfeedback.py). Expected tuples are derived by hand from those
scripts: each case names the line of reasoning that produces it."""
import json
import os
import random
import runpy
import sys
import types
from pathlib import Path

import pytest

from sdpo_fast.data import (AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE, Interaction, encode_interaction,
                            load_interactions)
from sdpo_fast.testing import tiny_tokenizer


def wildchat(convo, language="English"):
    row = {"conversation_hash": "h", "conversation": [{"role": r, "content": c} for r, c in convo]}
    if language is not None:
        row["language"] = language
    return row


def wildfeedback(convo):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[r], "value": c} for r, c in convo]}


def run(tmp_path, rows, **kwargs):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stream = load_interactions(path, **kwargs)
    out = [([(m["role"], m["content"]) for m in i.history], i.completion, i.followup, i.meta["row"],
            i.meta["assistant_index"]) for i in stream]
    return out, dict(stream.skipped)


ISSUE_EXAMPLE = [("user", "hi"), ("assistant", "   "), ("user", "hello?"), ("assistant", "Hello!"), ("user", "thanks")]


def test_wildchat_empty_messages_are_dropped_before_pairing_and_windowing(tmp_path):
    # normalize_conversation drops "   " -> [hi, hello?, Hello!, thanks]; the pair (Hello!, thanks) is at
    # index 2; history [hi, hello?] collapses to its first user message.
    out, skipped = run(tmp_path, [wildchat(ISSUE_EXAMPLE)], preset="paper")
    assert out == [([("user", "hi")], "Hello!", "thanks", 1, 2)] and skipped == {}
    default, _ = run(tmp_path, [wildchat(ISSUE_EXAMPLE)])
    assert default == [([("user", "hi"), ("assistant", "   "), ("user", "hello?")], "Hello!", "thanks", 1, 3)]


def test_wildchat_language_strip_limits_and_system(tmp_path):
    rows = [
        wildchat([("user", " q "), ("assistant", " a \n"), ("user", " f ")], language="en"),        # 1 kept, stripped
        wildchat([("user", "q"), ("assistant", "a"), ("user", "f")], language=" English "),        # 2 kept
        wildchat([("user", "q"), ("assistant", "a"), ("user", "f")], language="Chinese"),          # 3 language
        wildchat([("user", "q"), ("assistant", "a"), ("user", "f")], language=None),               # 4 no language
        wildchat([("user", "q"), ("assistant", "x" * 4096 + "  \n"), ("user", "f")]),              # 5 4096 stripped
        wildchat([("user", "y" * 4097), ("assistant", "a"), ("user", "f")]),                       # 6 user too long
        wildchat([("system", "s" * 5000), ("user", "q"), ("assistant", "a"), ("user", "f")]),      # 7 system dropped
        wildchat([("user", "q"), ("assistant", "  "), ("user", "f")]),                             # 8 2 messages left
        wildchat([("user", "q"), ("assistant", "a1"), ("assistant", "a2"), ("user", "f")]),        # 9 ends with gpt
    ]
    out, skipped = run(tmp_path, rows, preset="paper")
    assert out == [
        ([("user", "q")], "a", "f", 1, 1),
        ([("user", "q")], "a", "f", 2, 1),
        ([("user", "q")], "x" * 4096, "f", 5, 1),
        ([("user", "q")], "a", "f", 7, 1),
    ]
    assert skipped == {"filtered_language": 1, "filtered_language_missing": 1, "filtered_message_chars": 1,
                       "filtered_min_messages": 1, "history_ends_with_assistant": 1}


def test_wildchat_conversation_limit_counts_stripped_text(tmp_path):
    fits = [("user", "u" * 4000 + "   "), ("assistant", "a" * 4000 + "   ")] * 12 + [("user", "u" * 3996 + "  "), ("assistant", "b"), ("user", "end")]
    over = [("user", "u" * 4000), ("assistant", "a" * 4000)] * 12 + [("user", "u" * 3996), ("assistant", "bb"), ("user", "end")]
    assert sum(len(c.strip()) for _, c in fits) == 100_000 and sum(len(c) for _, c in over) == 100_001
    out, skipped = run(tmp_path, [wildchat(fits), wildchat(over)], preset="paper")
    assert {row for *_, row, _ in out} == {1} and skipped == {"filtered_conversation_chars": 1}
    last = out[-1]
    # Window: the last 5 cleaned messages before index 25, starting with a user message.
    assert last[0] == [("user", "u" * 4000), ("assistant", "a" * 4000), ("user", "u" * 4000),
                       ("assistant", "a" * 4000), ("user", "u" * 3996)]
    assert last[1:3] == ("b", "end") and last[4] == 25


def test_wildchat_window_drops_leading_assistant_then_collapses_runs(tmp_path):
    convo = [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("user", "u2b"), ("assistant", "a2"),
             ("user", "u3"), ("assistant", "a3"), ("user", "u4")]
    # Pair at 6 (a3, u4): last 5 of [u1 a1 u2 u2b a2 u3] = [a1 u2 u2b a2 u3] -> [u2 u2b a2 u3] -> [u2 a2 u3].
    # Pair at 4 (a2, u3): last 5 of [u1 a1 u2 u2b] = all -> [u1 a1 u2]. Pair at 1 (a1, u2): [u1].
    out, _ = run(tmp_path, [wildchat(convo)], preset="paper")
    assert out == [([("user", "u1")], "a1", "u2", 1, 1),
                   ([("user", "u1"), ("assistant", "a1"), ("user", "u2")], "a2", "u3", 1, 4),
                   ([("user", "u2"), ("assistant", "a2"), ("user", "u3")], "a3", "u4", 1, 6)]


def test_openai_rows_follow_the_wildchat_rules(tmp_path):
    row = {"messages": [{"role": r, "content": c} for r, c in ISSUE_EXAMPLE], "language": "en"}
    out, _ = run(tmp_path, [row], preset="paper")
    assert out == [([("user", "hi")], "Hello!", "thanks", 1, 2)]


def test_wildfeedback_rows_have_no_language_filter_and_drop_empty_messages_before_pairing(tmp_path):
    # The empty gpt message is dropped first -> [hi, hello?, Hello!, thanks]: one pair, at index 2, and no
    # interaction with an empty completion; history [hi, hello?] collapses to its first user message.
    out, skipped = run(tmp_path, [wildfeedback(ISSUE_EXAMPLE)], preset="paper")
    assert out == [([("user", "hi")], "Hello!", "thanks", 1, 2)]
    assert skipped == {}
    # an empty human message between two gpt messages: [q, a, b, f] -> (b, f) only, never an empty follow-up
    out, _ = run(tmp_path, [wildfeedback([("user", "q"), ("assistant", "a"), ("user", " \n "), ("assistant", "b"),
                                          ("user", "f")])], preset="paper")
    assert out == [([("user", "q"), ("assistant", "a")], "b", "f", 1, 2)]


@pytest.mark.parametrize("preset", [None, "paper", "strict"])
def test_no_preset_yields_an_empty_completion_or_followup(tmp_path, preset):
    """Fuzzed rows of both formats (empty, whitespace-only and system messages in any order): every interaction's
    completion and follow-up has text after stripping, and the rows do yield interactions."""
    rows = [wildchat(c) if k % 2 else {**wildfeedback(c), "language": "English"}
            for k, c in enumerate(_fuzzed_convos(3, 600))]
    out, _ = run(tmp_path, rows, preset=preset)
    assert len(out) >= 5
    assert all(completion.strip() and followup.strip() for _, completion, followup, _, _ in out)


def test_wildfeedback_limits_and_text_as_is(tmp_path):
    rows = [
        wildfeedback([("user", " q "), ("assistant", " a "), ("user", " f ")]),                      # 1 unstripped
        wildfeedback([("user", "y" * 5000), ("assistant", "a"), ("user", "f")]),                     # 2 users unlimited
        wildfeedback([("user", "q"), ("assistant", "x" * 4096 + " "), ("user", "f")]),               # 3 raw 4097
        wildfeedback([("user", "q"), ("assistant", "  "), ("user", "f")]),                           # 4 no pair
        wildfeedback([("user", "q"), ("assistant", "a")]),                                           # 5 too short
        wildfeedback([("user", "q"), ("assistant", "a1"), ("assistant", "a2"), ("user", "f")]),      # 6 ends with gpt
        wildfeedback([("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "f")]),           # 7 system
        wildfeedback([("user", "u" * 4096)] * 24 + [("user", "q" * 1697), ("assistant", "a"), ("user", "f")]),  # 8
    ]
    assert sum(len(c) for _, c in [("user", "u" * 4096)] * 24) + 1697 + 2 == 100_003
    out, skipped = run(tmp_path, rows, preset="paper")
    assert out == [
        ([("user", " q ")], " a ", " f ", 1, 1),
        ([("user", "y" * 5000)], "a", "f", 2, 1),
        ([("user", "q"), ("assistant", "a1")], "a2", "f", 6, 2),
        ([("user", "q")], "a", "f", 7, 1),
    ]
    assert skipped == {"filtered_message_chars": 1, "filtered_min_messages": 1, "filtered_conversation_chars": 1}


def test_strict_preset_keeps_our_choices(tmp_path):
    out, skipped = run(tmp_path, [wildfeedback(ISSUE_EXAMPLE)], preset="strict")
    assert out == [] and skipped == {"filtered_language_missing": 1}


def test_paper_preset_with_an_extra_filter(tmp_path):
    rows = [wildchat(ISSUE_EXAMPLE), wildchat(ISSUE_EXAMPLE[:3] + [("assistant", "x" * 50), ("user", "t")])]
    out, skipped = run(tmp_path, rows, preset="paper", max_message_chars=20)
    assert [o[3] for o in out] == [1] and skipped == {"filtered_message_chars": 1}


def chatml(messages):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_authors_offline_hindsight_block():
    assert AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE.replace("{followup}", "X") == (
        "\n\n[HINDSIGHT CONTEXT]\nThe following is a user response to your previous, insufficient attempt. "
        "Improve your response to the user prompt.\nFuture User Message: X")
    tok = tiny_tokenizer("qwen3")
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]
    item = Interaction(history, "a2", "  be brief \n")
    enc = encode_interaction(tok, item, hindsight_template="authors-offline")
    block = ("\n\n[HINDSIGHT CONTEXT]\nThe following is a user response to your previous, insufficient attempt. "
             "Improve your response to the user prompt.\nFuture User Message: be brief")
    teacher = chatml([history[0], {"role": "assistant", "content": "a1" + block}])
    n = len(enc.completion_ids)
    assert enc.teacher_input_ids[:-n] == tok(teacher, add_special_tokens=False)["input_ids"]
    table1 = encode_interaction(tok, item)
    assert table1.teacher_input_ids != enc.teacher_input_ids and table1.student_input_ids == enc.student_input_ids


def test_left_truncation_cuts_each_prompt_from_the_left():
    tok = tiny_tokenizer("qwen3")
    history = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "more " * 10}]
    item = Interaction(history, "reply", "follow")
    full = tok(chatml(history), add_special_tokens=False)["input_ids"]
    cut = len(full) - 7
    enc = encode_interaction(tok, item, max_prompt_tokens=cut, prompt_truncation="left")
    n = len(enc.completion_ids)
    assert enc.student_input_ids[:-n] == full[-cut:]
    assert len(enc.teacher_input_ids) - n == cut
    dropped = encode_interaction(tok, item, max_prompt_tokens=cut)
    assert dropped.student_input_ids[:-n] == tok(chatml(history[2:]), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="prompt_truncation"):
        encode_interaction(tok, item, prompt_truncation="right")


AUTHORS_REPO = os.environ.get("SDPO_FAST_AUTHORS_REPO")


def _fuzzed_convos(seed, n):
    rng = random.Random(seed)
    words = ["hi", "ok", "  ", "", " x ", "tea\n", "   \n", "a" * 4095 + "  ", "b" * 4097, "q" * 60000,
             "w" * 4096 + "\n\n"]
    out = []
    for _ in range(n):
        roles = [rng.choice(["user", "assistant", "user", "assistant", "system"]) for _ in range(rng.randint(0, 9))]
        out.append([(r, rng.choice(words) + (str(rng.randint(0, 9)) if rng.random() < 0.5 else "")) for r in roles])
    return out


@pytest.mark.skipif(AUTHORS_REPO is None, reason="set SDPO_FAST_AUTHORS_REPO to a lasgroup/user_interactions "
                                                  "checkout to run the authors' scripts as the peer")
@pytest.mark.parametrize("script", ["preprocess_wildchat.py", "preprocess_wildfeedback.py"])
def test_matches_the_authors_scripts_on_fuzzed_rows(tmp_path, monkeypatch, script):
    pytest.importorskip("pandas")
    wildchat_rows = script == "preprocess_wildchat.py"
    rng = random.Random(1)
    rows = [wildchat(c, language=rng.choice(["English", "en", " EN ", "Chinese", None])) if wildchat_rows
            else wildfeedback(c) for c in _fuzzed_convos(0, 1500)]

    class Rows(list):
        def shuffle(self, seed):
            return self

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args, **kwargs: Rows(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(sys, "argv", ["script", "--out_dir", str(tmp_path / "out")])
    runpy.run_path(str(Path(AUTHORS_REPO) / "auxiliary" / script), run_name="__main__")
    theirs = []
    for line in next((tmp_path / "out").glob("*.jsonl")).read_text().splitlines():
        entry = json.loads(line)
        role = {"human": "user", "gpt": "assistant"}
        theirs.append(([(role[m["from"]], m["value"]) for m in entry["prompt"]], entry["completion"]["value"],
                       entry["user_response"]["value"], entry.get("row_idx", entry.get("original_conv_id")) + 1,
                       entry["turn_id"]))
    ours, _ = run(tmp_path, rows, preset="paper")
    assert len(ours) > 20 and ours == theirs


def test_wildfeedback_rows_give_usable_interactions_under_the_paper_preset(tmp_path):
    from sdpo_fast.data import encode_interactions

    rows = [wildfeedback([("user", "Write a haiku."), ("assistant", "Leaves fall."), ("user", "Make it longer.")]),
            wildfeedback(ISSUE_EXAMPLE)]
    path = tmp_path / "wf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded, skipped = encode_interactions(tiny_tokenizer("qwen3"), load_interactions(path, preset="paper"),
                                           hindsight_template="authors-offline")
    assert len(encoded) == 2 and skipped == {}


def test_train_config_takes_the_authors_encoding_options():
    from sdpo_fast.train import TrainConfig
    from sdpo_fast.train.build import load_encoded_data

    config = TrainConfig(hindsight_template="authors-offline", prompt_truncation="left").validate()
    encoded, _ = load_encoded_data(config, tiny_tokenizer("qwen3"))
    assert any("[HINDSIGHT CONTEXT]" in tiny_tokenizer("qwen3").decode(e.teacher_input_ids) for e in encoded)
    for bad in ({"hindsight_template": "nope"}, {"prompt_truncation": "right"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()
