"""Per-row guards of the loaders: nesting depth, row and message size caps (before any tokenization), corrupt
compressed files counted as bad with their path; the rest of the data is still read."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from sdpo_fast.data import load_interactions, rows, sources


def _row(text="Hi", followup="Thanks") -> dict:
    return {"conversation": [{"role": "user", "content": text}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": followup}]}


def _load(path):
    stream = load_interactions(path)
    return list(stream), stream.stats


DEEP = "[" * 200_000 + "]" * 200_000


def test_deeply_nested_jsonl_row_is_one_bad_row(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + '{"conversation": ' + DEEP + "}\n" + json.dumps(_row()) + "\n")
    found, stats = _load(path)
    assert len(found) == 2 and stats.rows == 3 and dict(stats.skipped) == {"json_too_deep": 1}
    assert [(b.file, b.number) for b in stats.bad_rows] == [(str(path), 2)]


def test_deeply_nested_json_list_element_is_reported(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + json.dumps(_row()) + ", " + DEEP + "]")
    found, stats = _load(path)
    assert len(found) == 1 and dict(stats.skipped) == {"json_too_deep": 1}


def test_overlong_line_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 4096)
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row("x" * 20_000)) + "\n" + json.dumps(_row()) + "\n")
    found, stats = _load(path)
    assert len(found) == 2 and dict(stats.skipped) == {"row_too_large": 1} and stats.bad_rows[0].number == 2


def test_overlong_message_is_a_bad_row(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(followup="y" * (rows.MAX_MESSAGE_CHARS + 1))) + "\n")
    found, stats = _load(path)
    assert len(found) == 1 and dict(stats.skipped) == {"message_too_large": 1}


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_corrupt_gzip_is_a_bad_file_and_the_next_file_is_read(tmp_path, damage):
    data = tmp_path / "data"
    data.mkdir()
    payload = gzip.compress("".join(json.dumps(_row(f"q{i}")) + "\n" for i in range(200)).encode())
    bad = data / "a.jsonl.gz"
    bad.write_bytes(payload[: len(payload) // 2] if damage == "truncated" else b"plain text, not gzip\n")
    (data / "b.jsonl").write_text(json.dumps(_row()) + "\n")
    found, stats = _load(data)
    assert dict(stats.skipped) == {"corrupt_compressed_file": 1}
    assert stats.bad_rows[-1].file == str(bad) and stats.bad_rows[-1].reason == "corrupt_compressed_file"
    assert len(found) == stats.rows - 1 and found[-1].history[-1]["content"] == "Hi"
    if damage == "truncated":
        assert 0 < len(found) - 1 < 200  # the rows before the damage are read


_MEASURE = ("import resource, sys; from sdpo_fast.cli import main; code = main(sys.argv[1:]); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


def _stats_rss(path, tokenizer_dir) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", _MEASURE, "data", "stats", str(path), "--tokenizer",
                             tokenizer_dir], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout, int(result.stderr.split("maxrss_kb")[1].split()[0])


def test_data_stats_skips_a_50_mb_message_before_tokenizing(tmp_path, model_dir):
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(_row()) + "\n")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(_row()) + "\n" + json.dumps(_row("word " * 10_000_000)) + "\n")
    assert big.stat().st_size > 50_000_000
    _, base_kb = _stats_rss(small, model_dir)
    out, big_kb = _stats_rss(big, model_dir)
    assert "message_too_large" in out and "encoded:        1" in out
    assert big_kb - base_kb < 600 * 1024  # the row is parsed once and dropped: a few times 50 MB, not gigabytes


def test_corrupt_parquet_is_a_bad_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    data = tmp_path / "data"
    data.mkdir()
    table = pyarrow.Table.from_pylist([_row(f"q{i}") for i in range(50)])
    pq.write_table(table, data / "a.parquet")
    raw = (data / "a.parquet").read_bytes()
    (data / "a.parquet").write_bytes(raw[: len(raw) // 2])
    (data / "b.jsonl").write_text(json.dumps(_row()) + "\n")
    found, stats = _load(data)
    assert dict(stats.skipped) == {"corrupt_parquet_file": 1} and len(found) == 1
    assert stats.bad_rows[0].file == str(data / "a.parquet")
