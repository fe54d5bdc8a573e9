"""Rollout rows whose sampled token ids do not decode to the message's content are skipped and counted
("token_ids_text_mismatch"), never trained on silently; rows whose ids match are kept with their ids."""
from __future__ import annotations

import json

import pytest

from sdpo_fast.data import encode_interactions, load_interactions
from sdpo_fast.train import TrainConfig
from sdpo_fast.train.build import describe_counts, load_encoded_data

REPLY, OTHER = "Put it in boiling water for nine minutes.", "It is Sydney, the largest city."


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _row(reply: str, ids: list[int]) -> dict:
    return {"messages": [{"role": "user", "content": "How do I boil an egg?"},
                         {"role": "assistant", "content": reply, "token_ids": ids},
                         {"role": "user", "content": "Shorter please."}]}


def test_ids_that_decode_to_other_text_are_skipped_and_counted(tmp_path, tokenizer, model_dir):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(REPLY, add_special_tokens=False)["input_ids"] + [end]
    other = tokenizer(OTHER, add_special_tokens=False)["input_ids"] + [end]
    assert tokenizer.decode(ids, skip_special_tokens=True) == REPLY != tokenizer.decode(other, skip_special_tokens=True)
    path = tmp_path / "rollout.jsonl"
    rows = [_row(REPLY, ids), _row(REPLY, other), _row(" " + REPLY + "\n", ids), _row(REPLY, ids[:-2] + [end])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded, skipped = encode_interactions(tokenizer, load_interactions(str(path)))
    assert [e.completion_ids for e in encoded] == [ids, ids]  # surrounding whitespace is no mismatch
    assert dict(skipped) == {"token_ids_text_mismatch": 2}  # other text; a truncated text
    _, counts = load_encoded_data(TrainConfig(model=model_dir, data=str(path)), tokenizer)
    assert counts["skipped"]["token_ids_text_mismatch"] == 2 and "token_ids_text_mismatch" in describe_counts(counts)
