"""Offline importance clipping: rows carrying the sampler's token ids and log-probs, read (malformed ones
counted), encoded, and trained on with --importance-clip; the loss against a hand-built one."""
from __future__ import annotations

import json

import pytest
import torch

from sdpo_fast import cli
from sdpo_fast.data import Interaction, InteractionEncoder, encode_interactions, load_interactions
from sdpo_fast.train import TrainConfig, resolve_config, train

REQUESTS = [("How do I boil an egg?", "Put it in boiling water for nine minutes.", "Shorter please."),
            ("What is the capital of Australia?", "It is Sydney, the largest city.", "No, it is Canberra."),
            ("Write a haiku about rain.", "Soft rain on the roof, the garden drinks in silence, clouds drift.",
             "Nice, thanks!")]


def _row(request, reply, followup, token_ids=None, logprobs=None):
    assistant = {"role": "assistant", "content": reply}
    if token_ids is not None:
        assistant["token_ids"] = token_ids
    if logprobs is not None:
        assistant["logprobs"] = logprobs
    return {"messages": [{"role": "user", "content": request}, assistant, {"role": "user", "content": followup}]}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, tokenizer):
    """A JSONL rollout log: three good rows (ids with random log-probs), then malformed ones."""
    g = torch.Generator().manual_seed(0)
    good = []
    for request, reply, followup in REQUESTS:
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        good.append(_row(request, reply, followup, ids, torch.empty(len(ids)).uniform_(-7, -3, generator=g).tolist()))
    ids, lps = good[0]["messages"][1]["token_ids"], good[0]["messages"][1]["logprobs"]
    bad = [_row(*REQUESTS[0], ids, lps[:-1]),  # logprobs_length_mismatch
           _row(*REQUESTS[0], ids, [float("nan")] + lps[1:]),  # bad_logprobs
           _row(*REQUESTS[0], ids, [0.5] + lps[1:]),  # positive_logprobs
           _row(*REQUESTS[0], None, lps),  # logprobs_without_token_ids
           _row(*REQUESTS[0], [True] + ids[1:], lps),  # bad_token_ids
           _row(*REQUESTS[0], [len(tokenizer) + 5] + ids[1:], lps)]  # token_ids_out_of_vocab (an encoder skip)
    path = tmp_path_factory.mktemp("rollout") / "rollout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return str(path), good


def test_rows_with_token_ids_give_completion_ids_and_behavior_logprobs(rollout, tokenizer):
    path, good = rollout
    stream = load_interactions(path)
    encoded, skipped = encode_interactions(tokenizer, stream)
    assert [e.completion_ids for e in encoded] == [r["messages"][1]["token_ids"] for r in good]
    assert [e.behavior_logprobs for e in encoded] == [r["messages"][1]["logprobs"] for r in good]
    assert dict(stream.stats.skipped) == {"logprobs_length_mismatch": 1, "bad_logprobs": 1, "positive_logprobs": 1,
                                          "logprobs_without_token_ids": 1, "bad_token_ids": 1}
    assert [b.number for b in stream.bad_rows] == [4, 5, 6, 7, 8]
    assert dict(skipped) == {"token_ids_out_of_vocab": 1}
    encoder = InteractionEncoder(tokenizer, max_completion_tokens=3)
    cut = encoder.encode(stream_first(path))
    assert cut.completion_ids == good[0]["messages"][1]["token_ids"][:3]
    assert cut.behavior_logprobs == good[0]["messages"][1]["logprobs"][:3]
    interaction = Interaction([{"role": "user", "content": "Hi"}], "Hello there.", "Thanks")
    with pytest.raises(ValueError, match="completion_logprobs must be 2 finite"):
        encoder.encode(interaction, completion_ids=[5, 6], completion_logprobs=[-1.0])
    with pytest.raises(ValueError, match="completion_logprobs must be 2 finite"):
        encoder.encode(interaction, completion_ids=[5, 6], completion_logprobs=[-1.0, 0.1])
    assert encoder.encode(interaction, completion_ids=[5, 6, 7, 8], completion_logprobs=[-1, -2, -3, -4]) \
        .behavior_logprobs == [-1.0, -2.0, -3.0]


def stream_first(path):
    return next(iter(load_interactions(path)))


def _hand_built_loss(model, encoded, clip, ignore_first_k):
    """Plain PyTorch: mean over interactions of the mean over loss tokens of -min(pi/mu, clip) * A * log pi."""
    losses, ratios = [], []
    with torch.no_grad():
        for e in encoded:
            n = len(e.completion_ids)
            targets = torch.tensor(e.completion_ids)[:, None]
            lp = model(input_ids=torch.tensor([e.student_input_ids])).logits[0, -n - 1:-1].float() \
                .log_softmax(-1).gather(-1, targets)[:, 0]
            lq = model(input_ids=torch.tensor([e.teacher_input_ids])).logits[0, -n - 1:-1].float() \
                .log_softmax(-1).gather(-1, targets)[:, 0]
            ratio = torch.exp(lp - torch.tensor(e.behavior_logprobs)).clamp(max=clip)[ignore_first_k:]
            ratios.append(ratio)
            losses.append(-(ratio * (lq - lp)[ignore_first_k:] * lp[ignore_first_k:]).mean())
    return torch.stack(losses).mean().item(), torch.cat(ratios)


def test_training_with_importance_clip_matches_a_hand_built_loss(rollout, model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = rollout
    clip = 1.0
    config = TrainConfig(model=model_dir, data=path, output_dir=str(tmp_path / "run"), batch_size=3, max_steps=1,
                         lr=1e-3, ignore_first_k=1, importance_clip=clip, device="cpu", save_minutes=None)
    summary = train(config, progress=False, log=lambda m: None)
    assert summary["data"]["skipped"]["bad_logprobs"] == 1 and summary["data"]["bad_rows"] == 5
    encoded, _ = encode_interactions(tokenizer, load_interactions(path))
    expected, ratios = _hand_built_loss(AutoModelForCausalLM.from_pretrained(model_dir), encoded, clip, 1)
    assert (ratios == clip).any() and (ratios < clip).any()  # the clip bites on some tokens, not all
    assert summary["first"]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    unclipped = train(TrainConfig(**{**config.to_dict(), "importance_clip": None, "output_dir": str(tmp_path / "b")}),
                      progress=False, log=lambda m: None)
    assert unclipped["first"]["loss"] != pytest.approx(expected, rel=1e-3)


def test_importance_clip_without_logprobs_is_refused_before_the_model_loads(tokenizer, model_dir, tmp_path,
                                                                            monkeypatch, capsys):
    from sdpo_fast.train import trainer

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(_row(*r)) + "\n" for r in REQUESTS))
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"importance_clip needs .* but 3 of the 3 encoded interactions have none: "
                                         r"give each assistant message \"token_ids\" and \"logprobs\""):
        train(TrainConfig(model=model_dir, data=str(path), output_dir=str(tmp_path / "run"), importance_clip=2.0,
                          device="cpu"), progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", "--model", model_dir, "--data", str(path), "--output-dir", str(tmp_path / "cli"),
                     "--importance-clip", "2", "--device", "cpu", "--no-progress"]) != 0
    assert "importance_clip needs" in capsys.readouterr().err


@pytest.mark.parametrize("values,message", [
    ({"importance_clip": 0}, "importance_clip must be a finite number > 0"),
    ({"importance_clip": -1.0}, "importance_clip must be a finite number > 0"),
    ({"loss": "sft", "importance_clip": 2.0}, "importance_clip applies to loss 'sdpo' only"),
])
def test_bad_importance_clip_values_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(values)


def test_importance_clip_yaml_key_and_flag(tmp_path):
    assert resolve_config({"importance_clip": 2}).importance_clip == 2.0
    args = cli.build_parser().parse_args(["train", "--importance-clip", "1.5"])
    assert args.importance_clip == 1.5
    assert cli.build_parser().parse_args(["train", "--importance-clip", "none"]).importance_clip is None
