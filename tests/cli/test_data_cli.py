import argparse
import json
import re

import pytest

from sdpo_fast import cli
from sdpo_fast.cli import data as data_command
from sdpo_fast.testing import tiny_tokenizer

SECRET = "zebra-secret-7731"


def run(argv):
    parser = argparse.ArgumentParser()
    data_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def write_rows(path):
    rows = [
        {"messages": [{"role": "user", "content": f"{SECRET} question"}, {"role": "assistant", "content": f"{SECRET} answer"},
                      {"role": "user", "content": f"{SECRET} follow-up"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "thanks"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "u"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken " + SECRET + "\n")
    return path


def test_registered_in_cli():
    assert "sdpo_fast.cli.data" in cli._COMMANDS


def test_stats_counts_without_tokenizer(tmp_path, capsys):
    assert run(["data", "stats", str(write_rows(tmp_path / "d.jsonl"))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"rows read:\s+3\n", out) and re.search(r"conversations:\s+2\n", out)
    assert re.search(r"interactions:\s+2\n", out)
    assert re.search(r"empty_completion\s+1\n", out) and re.search(r"invalid_json\s+1\n", out)
    assert "d.jsonl:3: invalid_json" in out
    assert SECRET not in out


def test_stats_with_tokenizer_prints_percentiles(tmp_path, capsys):
    tiny_tokenizer("qwen3").save_pretrained(tmp_path / "tok")
    path = write_rows(tmp_path / "d.jsonl")
    assert run(["data", "stats", str(path), "--tokenizer", str(tmp_path / "tok"), "--max-history", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"encoded:\s+2\n", out)
    for name in ("student prompt", "teacher prompt", "completion", "shared prefix"):
        assert re.search(rf"{name}\s+\d+\s+\d+\s+\d+\s+\d+\n", out)
    assert SECRET not in out


def test_percentiles_nearest_rank():
    assert data_command.percentiles(list(range(1, 101))) == {50: 50, 90: 90, 99: 99, 100: 100}
    assert data_command.percentiles([7]) == {50: 7, 90: 7, 99: 7, 100: 7}
    assert data_command.percentiles([4, 1, 3, 2]) == {50: 2, 90: 4, 99: 4, 100: 4}


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        run(["data", "stats", str(write_rows(tmp_path / "d.jsonl")), "--tokenizer", str(tmp_path / "nope")])
