"""The bundled local tasks (the README's tiny-model eval example) load without any download: importing the
IFEval sample's scoring does not ask NLTK for punkt_tab, and the sample's instructions score without it."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def test_ifeval_sample_scoring_imports_and_scores_without_nltk_downloads(monkeypatch):
    nltk = pytest.importorskip("nltk")
    pytest.importorskip("lm_eval")
    pytest.importorskip("langdetect")
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail(f"NLTK download of {a} attempted"))
    monkeypatch.setattr(nltk.downloader.Downloader, "download", lambda *a, **k: pytest.fail("NLTK download"))
    for name in [m for m in sys.modules if m.startswith("lm_eval.tasks.ifeval")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    spec = importlib.util.spec_from_file_location("ifeval_local_utils", DATA / "ifeval_local_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert "LOCAL_RANK" not in os.environ
    for line in (DATA / "ifeval_sample.jsonl").read_text().splitlines():
        doc = json.loads(line)
        scores = utils.process_results(doc, ["A reply, with a comma."])
        assert set(scores) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                               "inst_level_loose_acc"}
