import json
import sys

import pytest
import torch

from sdpo_fast.cli import main
from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.eval import EvalModels, evaluate_checkpoint, load_eval_prompts, markdown_table
from sdpo_fast.eval import run as eval_run
from sdpo_fast.online.judge import RuleJudge, judge_pair
from sdpo_fast.model.generation import generate_batch
from sdpo_fast.online.personas import get_persona
from sdpo_fast.train.setup import load_model, load_tokenizer

PROMPTS = ["Any advice on staying focused?", "Tell me about jazz.", "How do I start running?"]
OPTIONS = dict(max_new_tokens=10, device="cpu", temperature=1.0, seed=3)


def _direct_replies(path, prompts, seed):
    model = load_model(str(path), dtype=torch.float32, device=torch.device("cpu")).eval()
    tok = load_tokenizer(str(path))
    return generate_batch(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=10,
                          temperature=1.0, seed=seed)


def test_pairwise_run_writes_results_and_resumes_after_an_interruption(tiny_checkpoint, tmp_path, monkeypatch):
    persona = get_persona("brief")
    out = tmp_path / "results"
    real = eval_run._replies
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_run, "_replies", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(tiny_checkpoint, out, prompts=PROMPTS, judge=RuleJudge(), persona=persona, **OPTIONS)
    stored = json.loads((out / "pairwise.json").read_text())
    assert list(stored["replies"]) == ["base"] and "sdpo" not in stored

    calls.clear()
    monkeypatch.setattr(eval_run, "_replies", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    records = evaluate_checkpoint(tiny_checkpoint, out, prompts=PROMPTS, judge=RuleJudge(), persona=persona,
                                  **OPTIONS)
    assert len(calls) == 1  # only the checkpoint's replies; the base model's were kept
    (record,) = records
    base = _direct_replies(tiny_model_path(), PROMPTS, 3)
    trained = _direct_replies(tiny_checkpoint, PROMPTS, 3)
    assert record["replies"] == {"base": base, "sdpo": trained}
    outcomes = [judge_pair(RuleJudge(), persona, p, t, b) for p, t, b in zip(PROMPTS, trained, base)]
    assert record["sdpo"]["outcomes"] == outcomes
    table = (out / "results.md").read_text()
    assert table == markdown_table(records) and "| Base | 50.0 |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(EvalModels, "get", lambda self, side: pytest.fail("a finished benchmark was rerun"))
    again = evaluate_checkpoint(tiny_checkpoint, out, prompts=PROMPTS, judge=RuleJudge(), persona=persona, **OPTIONS)
    assert again == records
    with pytest.raises(ValueError, match="other settings"):
        evaluate_checkpoint(tiny_checkpoint, out, prompts=PROMPTS[:2], judge=RuleJudge(), persona=persona, **OPTIONS)


def test_adapter_checkpoint_is_merged_into_its_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = load_model(str(tiny_model_path()), dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        expected = lora(ids).logits
        with lora.disable_adapter():
            expected_base = lora(ids).logits
    models = EvalModels(tmp_path / "adapter", device="cpu")
    assert models.adapter and models.base == str(tiny_model_path())
    with torch.no_grad():
        got = models.get("sdpo")[0](ids).logits
        got_base = models.get("base")[0](ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_base, expected_base, rtol=0, atol=0)
    assert (got - got_base).abs().max() > 1e-3


def test_missing_lm_eval_is_a_clear_error_before_any_model_loads(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        evaluate_checkpoint(tmp_path / "missing", tmp_path / "out", tasks=["ifeval"])


def test_bad_checkpoint_and_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        EvalModels(tmp_path / "missing")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="--base"):
        EvalModels(tmp_path / "ckpt")
    (tmp_path / "p.jsonl").write_text('{"instruction": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "a"}, {"text": "b"}]))
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert load_eval_prompts(tmp_path / "p.jsonl") == ["a", "b"] == load_eval_prompts(tmp_path / "p.txt")
    with pytest.raises(ValueError, match="row 2"):
        load_eval_prompts(tmp_path / "p.json")


def test_cli(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    args = ["eval", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.txt"),
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args) == 2 and "needs --persona" in capsys.readouterr().err
    assert main(args + ["--persona", "brief", "--length-control"]) == 0
    out = capsys.readouterr().out
    assert "| model | win rate vs base (LC; " in out and (tmp_path / "o" / "pairwise.json").is_file()
    assert main(["eval", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
