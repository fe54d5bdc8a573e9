import collections
import json
import time

import pytest

from sdpo_fast.data import BadRowError, ConversationFilter, PRESETS, load_interactions
from sdpo_fast.data import sources


def wildchat(convo, **fields):
    return {"conversation_hash": "h", "model": "gpt-x", "language": "English", "toxic": False,
            "conversation": [{"role": r, "content": c, "language": "English", "toxic": False} for r, c in convo], **fields}


def wildfeedback(convo):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[r], "value": c} for r, c in convo], "chosen": "x", "rejected": "y"}


def openai(convo):
    return {"messages": [{"role": r, "content": c} for r, c in convo]}


CONVO = [("system", "sys"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")]
EXPECTED = [
    ([("system", "sys"), ("user", "u1")], "a1", "u2"),
    ([("system", "sys"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")], "a2", "u3"),
]


def as_tuples(interactions):
    return [([(m["role"], m["content"]) for m in i.history], i.completion, i.followup) for i in interactions]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", [wildchat, wildfeedback, openai])
def test_each_row_format_jsonl(tmp_path, fmt):
    stream = load_interactions(write_jsonl(tmp_path / "d.jsonl", [fmt(CONVO)]))
    assert as_tuples(stream) == EXPECTED
    assert (stream.stats.rows, stream.stats.conversations, stream.stats.interactions) == (1, 1, 2)
    assert not stream.skipped and not stream.bad_rows


def test_meta_has_ids_but_no_content(tmp_path):
    (first, _) = list(load_interactions(write_jsonl(tmp_path / "d.jsonl", [wildchat(CONVO, turn=3)])))
    assert first.meta == {"conversation_id": "h", "model": "gpt-x", "language": "English", "assistant_index": 2, "toxic": False, "row": 1}


def test_json_list_parquet_and_directories_give_the_same_interactions(tmp_path, monkeypatch):
    rows = [wildchat(CONVO), openai(CONVO), wildfeedback(CONVO)]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([wildchat(CONVO)] * 3), tmp_path / "d.parquet", row_group_size=2)
    expected = EXPECTED * 3
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 7)  # many refills, elements span chunks
    assert as_tuples(load_interactions(tmp_path / "list.json")) == expected
    assert as_tuples(load_interactions(tmp_path / "lines.json")) == expected
    assert as_tuples(load_interactions(tmp_path / "d.parquet")) == expected
    assert [i.meta["row"] for i in load_interactions(tmp_path / "d.parquet")] == [1, 1, 2, 2, 3, 3]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [openai(CONVO)])
    pq.write_table(pa.Table.from_pylist([wildchat(CONVO)]), folder / "sub" / "b.parquet")
    (folder / "README.md").write_text("ignored")
    assert as_tuples(load_interactions(folder)) == EXPECTED * 2


def test_gzip_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(openai(CONVO)) + "\n")
    assert as_tuples(load_interactions(tmp_path / "d.jsonl.gz")) == EXPECTED


def test_saved_datasets_directory_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [openai(CONVO)] * 2
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert as_tuples(load_interactions(tmp_path / "ds")) == EXPECTED * 2
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert as_tuples(load_interactions(tmp_path / "dd", split="test")) == EXPECTED
    with pytest.raises(ValueError, match="split"):
        list(load_interactions(tmp_path / "dd", split="validation"))


BAD_LINES = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "row_not_an_object"),
    (json.dumps({"text": "hello"}), "missing_conversation_field"),
    (json.dumps({"messages": "hello"}), "conversation_not_a_list"),
    (json.dumps({"messages": ["hello"]}), "message_not_an_object"),
    (json.dumps({"messages": [{"role": "user"}]}), "message_missing_field"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "unknown_role"),
    (json.dumps({"conversations": [{"from": "user", "value": "x"}]}), "unknown_role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}), "non_string_content"),
    (json.dumps({"conversation": [{"role": "assistant", "content": None}]}), "non_string_content"),
]


def test_bad_rows_are_skipped_with_line_numbers(tmp_path):
    lines = [json.dumps(openai(CONVO)), ""]  # blank lines are not rows
    for text, _ in BAD_LINES:
        lines.append(text)
    lines.append(json.dumps(openai(CONVO)))
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    stream = load_interactions(path)
    assert as_tuples(stream) == EXPECTED * 2
    expected_bad = [(3 + k, reason) for k, (_, reason) in enumerate(BAD_LINES)] + [(len(lines) + 1, "invalid_utf8")]
    assert [(b.number, b.reason) for b in stream.bad_rows] == expected_bad
    assert all(b.file == str(path) for b in stream.bad_rows)
    assert stream.skipped == collections.Counter(reason for _, reason in expected_bad)
    assert stream.stats.rows == len(BAD_LINES) + 3 and stream.stats.conversations == 2


def test_strict_mode_raises_at_first_bad_row_with_location(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(openai(CONVO)), json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "{bad"])
    stream = load_interactions(path, strict=True)
    got = []
    with pytest.raises(BadRowError, match=r"row 2: unknown_role") as info:
        for item in stream:
            got.append(item)
    assert info.value.location.number == 2 and len(got) == 2
    assert "x" not in str(info.value).replace(str(path), "")


def test_strict_mode_does_not_raise_for_skipped_interactions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [openai([("user", "u"), ("assistant", " "), ("user", "v")])])
    stream = load_interactions(path, strict=True)
    assert list(stream) == [] and stream.skipped == {"empty_completion": 1}


def test_json_list_with_broken_element_reports_it_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 16)
    text = "[" + json.dumps(openai(CONVO)) + ", {broken, " + json.dumps(openai(CONVO)) + "]"
    (tmp_path / "d.json").write_text(text)
    stream = load_interactions(tmp_path / "d.json")
    assert as_tuples(stream) == EXPECTED
    assert [(b.number, b.reason) for b in stream.bad_rows] == [(2, "invalid_json")]
    (tmp_path / "e.json").write_text("[" + json.dumps(openai(CONVO)) + " " + json.dumps(openai(CONVO)) + "]")
    stream = load_interactions(tmp_path / "e.json")
    assert as_tuples(stream) == EXPECTED and stream.skipped == {"invalid_json": 1}
    monkeypatch.setattr(sources, "MAX_JSON_ELEMENT_CHARS", 40)
    (tmp_path / "f.json").write_text('[{"messages": [], "pad": "' + "x" * 200 + '"}]')
    stream = load_interactions(tmp_path / "f.json")
    assert list(stream) == [] and stream.skipped == {"json_element_too_large": 1}


def test_empty_json_list_and_empty_file(tmp_path):
    (tmp_path / "a.json").write_text(" [ ] ")
    (tmp_path / "b.jsonl").write_text("")
    for name in ("a.json", "b.jsonl"):
        stream = load_interactions(tmp_path / name)
        assert list(stream) == [] and stream.stats.rows == 0


def test_each_pass_rereads_and_resets_stats(tmp_path):
    stream = load_interactions(write_jsonl(tmp_path / "d.jsonl", [openai(CONVO), "{bad"]))
    assert len(list(stream)) == 2 and len(list(stream)) == 2
    assert stream.skipped == {"invalid_json": 1} and len(stream.bad_rows) == 1


def test_max_history_is_passed_through(tmp_path):
    stream = load_interactions(write_jsonl(tmp_path / "d.jsonl", [openai(CONVO)]), max_history=1)
    assert as_tuples(stream)[1][0] == [("system", "sys"), ("user", "u2")]


def filtered(tmp_path, rows, **kwargs):
    stream = load_interactions(write_jsonl(tmp_path / "f.jsonl", rows), **kwargs)
    return [i.meta["row"] for i in stream], stream.skipped


def test_no_filters_by_default(tmp_path):
    rows = [wildchat(CONVO, language="French", toxic=True), wildchat([("user", "u"), ("assistant", "a" * 10_000), ("user", "v")])]
    assert filtered(tmp_path, rows)[0] == [1, 1, 2]


def test_language_filter(tmp_path):
    rows = [wildchat(CONVO), wildchat(CONVO, language="French"), openai(CONVO), wildchat(CONVO, language="english")]
    kept, skipped = filtered(tmp_path, rows, language="English")
    assert kept == [1, 1, 4, 4] and skipped == {"filtered_language": 1, "filtered_language_missing": 1}
    kept, _ = filtered(tmp_path, rows, language=["french", "english"])
    assert kept == [1, 1, 2, 2, 4, 4]


def test_size_and_length_filters(tmp_path):
    short = [("user", "u"), ("assistant", "a"), ("user", "v")]
    rows = [
        openai(short),                                                    # 3 messages, 3 chars
        openai(short[:2]),                                                # 2 messages
        openai([("user", "u"), ("assistant", "a" * 11), ("user", "v")]),  # one message of 11 chars
        openai([("user", "u" * 10)] + short[1:] + [("assistant", "b" * 10), ("user", "w")]),
    ]
    kept, skipped = filtered(tmp_path, rows, min_messages=3, max_message_chars=10, max_conversation_chars=15)
    assert kept == [1]
    assert skipped == {"filtered_min_messages": 1, "filtered_message_chars": 1, "filtered_conversation_chars": 1}
    assert filtered(tmp_path, rows, max_message_chars=11)[0] == [1, 3, 4, 4]


def test_toxic_filter_uses_row_and_message_flags(tmp_path):
    msg_toxic = wildchat(CONVO)
    msg_toxic["conversation"][3]["toxic"] = True
    rows = [wildchat(CONVO), wildchat(CONVO, toxic=True), msg_toxic]
    kept, skipped = filtered(tmp_path, rows, drop_toxic=True)
    assert kept == [1, 1] and skipped == {"filtered_toxic": 2}


def test_exact_duplicate_removal(tmp_path):
    other = [("user", "u1"), ("assistant", "a1"), ("user", "different")]
    rows = [wildchat(CONVO), openai(CONVO), wildfeedback(other), wildchat(other, conversation_hash="z")]
    kept, skipped = filtered(tmp_path, rows, deduplicate=True)
    assert kept == [1, 1, 3] and skipped == {"duplicate": 2}
    assert len(filtered(tmp_path, rows)[0]) == 6


def test_strict_preset_and_overrides(tmp_path):
    assert PRESETS["strict"] == ConversationFilter(
        languages=frozenset({"english"}), max_message_chars=4096, max_conversation_chars=100_000, min_messages=3
    )
    rows = [
        wildchat(CONVO),
        wildchat(CONVO, language="Chinese"),
        wildchat(CONVO[1:3]),
        wildchat([("user", "u"), ("assistant", "a" * 4097), ("user", "v")]),
        wildchat([("user", "u"), ("assistant", "a" * 3000), ("user", "v")]),
    ]
    kept, skipped = filtered(tmp_path, rows, preset="strict")
    assert kept == [1, 1, 5]
    assert skipped == {"filtered_language": 1, "filtered_min_messages": 1, "filtered_message_chars": 1}
    kept, _ = filtered(tmp_path, rows, preset="strict", max_message_chars=2000)
    assert kept == [1, 1]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_history": 0}, ValueError, "max_history"),
        ({"strict": "yes"}, TypeError, "strict"),
        ({"preset": "nope"}, ValueError, "preset"),
        ({"language": 3}, TypeError, "language"),
        ({"min_messages": 0}, ValueError, "min_messages"),
        ({"max_message_chars": 2.5}, ValueError, "max_message_chars"),
        ({"deduplicate": 1}, TypeError, "deduplicate"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    path = write_jsonl(tmp_path / "d.jsonl", [openai(CONVO)])
    with pytest.raises(error, match=match):
        load_interactions(path, **kwargs)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="source"):
        load_interactions(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="source"):
        load_interactions("data/missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must end with"):
        load_interactions(tmp_path / "d.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*files"):
        load_interactions(tmp_path / "empty")
    with pytest.raises(TypeError, match="source"):
        load_interactions(42)


def test_hub_id_fails_fast_and_clearly_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE.*local path"):
        load_interactions("allenai/WildChat-1M")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot be reached.*local path"):
        load_interactions("allenai/WildChat-1M")
    assert time.monotonic() - start < 10


def test_grouping_labels_are_kept_in_meta(tmp_path):
    path = tmp_path / "labelled.jsonl"
    rows = [{"kind": "style", "label": 3, "conversation": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "less formal"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (interaction,) = list(load_interactions(path))
    assert interaction.meta["kind"] == "style" and interaction.meta["label"] == 3
