import collections
import json

import pytest

from sdpo_fast.data import load_interactions, sample_path
from sdpo_fast.data.synthetic import (
    FOLLOWUP_KINDS, KINDS, SAMPLE_SEED, SAMPLE_SIZE, generate_conversations, write_jsonl,
)


def test_shipped_sample_is_the_generator_output():
    lines = sample_path().read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == list(generate_conversations(SAMPLE_SIZE, seed=SAMPLE_SEED))


def test_sample_covers_every_kind():
    kinds = collections.Counter(json.loads(line)["kind"] for line in sample_path().read_text(encoding="utf-8").splitlines())
    assert set(kinds) == set(KINDS)


def test_generator_is_seeded():
    assert list(generate_conversations(20, seed=3)) == list(generate_conversations(20, seed=3))
    assert list(generate_conversations(20, seed=3)) != list(generate_conversations(20, seed=4))
    rows = list(generate_conversations(8, kinds=["correction"]))
    assert {r["kind"] for r in rows} == {"correction"}
    with pytest.raises(ValueError, match="kinds"):
        list(generate_conversations(1, kinds=["bogus"]))
    with pytest.raises(ValueError, match="n must"):
        list(generate_conversations(-1))


def test_loading_the_sample_matches_its_edge_cases():
    rows = [json.loads(line) for line in sample_path().read_text(encoding="utf-8").splitlines()]
    kinds = collections.Counter(r["kind"] for r in rows)
    stream = load_interactions(sample_path())
    by_kind = collections.Counter(rows[i.meta["row"] - 1]["kind"] for i in stream)
    assert all(by_kind[k] >= kinds[k] for k in FOLLOWUP_KINDS)
    assert by_kind["no_followup"] == by_kind["empty_reply"] == by_kind["blank_followup"] == 0
    assert by_kind["long"] == 4 * kinds["long"]
    assert stream.skipped == {
        "empty_completion": kinds["empty_reply"],
        "empty_followup": kinds["blank_followup"],
        "no_user_message_in_history": kinds["assistant_first"],
    }
    assert not stream.bad_rows
    dedup = load_interactions(sample_path(), deduplicate=True)
    list(dedup)
    assert dedup.skipped["duplicate"] == kinds["duplicate"]


def test_write_jsonl_is_atomic(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(rows(), target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    write_jsonl([{"a": "é"}], target)
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "é"}
