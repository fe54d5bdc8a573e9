"""`evaluate_checkpoint` through lm-evaluation-harness on local task data (offline): IFEval's own scoring on a
tiny IFEval-format sample, and a multiple-choice task; each score is checked against the same outputs."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("langdetect")  # lm-eval's IFEval scoring imports it

from sdpo_fast.eval import EvalModels, evaluate_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data"


def _tasks_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(DATA / "ifeval_local_utils.py", folder)
    for task, sample in (("ifeval_local", "ifeval_sample.jsonl"), ("mc_local", "mc_sample.jsonl")):
        text = (DATA / f"{task}.yaml").read_text().replace(f"tests/eval/data/{sample}", str(DATA / sample))
        assert str(DATA / sample) in text
        (folder / f"{task}.yaml").write_text(text)
    return folder


def _follows(instruction: str, kwargs: dict, text: str) -> bool:
    """IFEval's strict checks for the instructions of the sample, written from its task description."""
    if instruction == "punctuation:no_comma":
        return "," not in text
    if instruction == "detectable_format:title":
        return re.search(r"<<[^\n]+>>", text) is not None
    if instruction == "keywords:forbidden_words":
        return not any(re.search(rf"\b{w}\b", text, re.IGNORECASE) for w in kwargs["forbidden_words"])
    if instruction == "keywords:existence":
        return all(re.search(k, text, re.IGNORECASE) for k in kwargs["keywords"])
    if instruction == "startend:end_checker":
        return text.strip().strip('"').lower().endswith(kwargs["end_phrase"].strip().lower())
    if instruction == "startend:quotation":
        text = text.strip()
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'
    if instruction == "detectable_format:number_bullet_lists":
        lines = text.split("\n")
        return sum(bool(re.match(r"^\s*\*[^\*]", x) or re.match(r"^\s*-", x)) for x in lines) == kwargs["num_bullets"]
    raise AssertionError(instruction)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split as lm-eval does (trailing context whitespace joins the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


@pytest.mark.slow
def test_lm_eval_scores_match_direct_checks_and_resume(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "results"
    kwargs = dict(tasks=["ifeval_local", "mc_local"], include_path=str(_tasks_dir(tmp_path)), seed=1,
                  log_samples=True, device="cpu")
    records = evaluate_checkpoint(tiny_checkpoint, out, **kwargs)
    by_task = {r["benchmark"]: r for r in records}
    docs = [json.loads(x) for x in (DATA / "ifeval_sample.jsonl").read_text().splitlines()]
    mc_docs = [json.loads(x) for x in (DATA / "mc_sample.jsonl").read_text().splitlines()]
    models = EvalModels(tiny_checkpoint, device="cpu")
    for side in ("base", "sdpo"):
        ifeval = by_task["ifeval_local"][side]
        assert ifeval["primary"] == "prompt_level_loose_acc,none" and ifeval["n"] == len(docs)
        direct = [all(_follows(i, k, s["filtered_resps"][0]) for i, k in
                      zip(docs[s["doc_id"]]["instruction_id_list"], docs[s["doc_id"]]["kwargs"]))
                  for s in ifeval["samples"]]
        assert ifeval["metrics"]["prompt_level_strict_acc,none"] == pytest.approx(sum(direct) / len(direct))

        mc = by_task["mc_local"][side]
        model, tokenizer = models.get(side)
        correct = []
        for sample in mc["samples"]:
            mine = [_loglikelihood(model, tokenizer, ctx, cont) for ctx, cont in sample["arguments"]]
            theirs = [ll for ll, _ in sample["filtered_resps"]]
            assert mine == pytest.approx(theirs, abs=2e-4)
            assert "<think>\n\n</think>" in sample["arguments"][0][0]  # the template as in training
            correct.append(max(range(len(mine)), key=mine.__getitem__) == mc_docs[sample["doc_id"]]["label"])
        assert mc["metrics"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert by_task["ifeval_local"]["base"]["samples"] != by_task["ifeval_local"]["sdpo"]["samples"]
    table = (out / "results.md").read_text()
    assert "ifeval_local (prompt_level_loose_acc, n=8)" in table and "mc_local (acc, n=6)" in table

    monkeypatch.setattr(EvalModels, "get", lambda self, side: pytest.fail("a finished benchmark was rerun"))
    assert evaluate_checkpoint(tiny_checkpoint, out, **kwargs) == records
