"""lm-evaluation-harness on an already-loaded model (its HFLM wrapper; no Hub access needed for the model)."""
from __future__ import annotations

import difflib
import inspect
import json
import math
from pathlib import Path

from ..data import default_template_kwargs

_SAMPLE_KEYS = ("doc_id", "target", "arguments", "filtered_resps")

PRIMARY_METRICS = {
    "ifeval": "prompt_level_loose_acc",
    "mmlu_pro": "exact_match",
    "truthfulqa_mc1": "acc",
    "hellaswag": "acc_norm",
    "commonsense_qa": "acc",
}
"""The metric the paper reports per task (also for tasks named `<key>_...`); other tasks report their first."""


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError("benchmarks need lm-evaluation-harness: pip install lm-eval "
                          "(or pip install -e '.[eval]')") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager (built-in tasks plus the YAMLs under include_path), after checking that it knows
    every name in `tasks`; ValueError naming the unknown ones (before any model loads)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path!r} is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        hints = "; ".join(f"{t!r}: did you mean {m}?" for t, m in close.items() if m)
        raise ValueError(f"unknown lm-eval task(s) {unknown}" + (f" ({hints})" if hints else "")
                         + "; `lm-eval ls tasks` lists them, --include-path adds a folder of task YAMLs")
    return manager


def primary_metric(task: str, metrics: dict[str, float]) -> str:
    """The key of `metrics` (lm-eval's "name,filter" keys) the table shows for `task`."""
    family = max((k for k in PRIMARY_METRICS if task == k or task.startswith(k + "_")), key=len, default=None)
    wanted = PRIMARY_METRICS.get(family)
    names = [k for k in metrics if not k.split(",")[0].endswith("_stderr") and k.split(",")[0] != "sample_len"]
    for key in names:
        if wanted is not None and key.split(",")[0] == wanted:
            return key
    if not names:
        raise ValueError(f"lm-eval returned no metric for task {task!r}")
    return names[0]


def run_lm_eval(model, tokenizer, task: str, *, limit: int | float | None = None, seed: int = 0,
                include_path: str | None = None, batch_size: int = 1, max_length: int | None = None,
                chat_template: bool = True, log_samples: bool = False, manager=None) -> dict:
    """One lm-eval task on `model` (a transformers causal LM, eval mode) with the tokenizer's chat template
    (Qwen3-style templates without thinking, as in training, where lm-eval takes chat_template_args).

    Returns {"task", "metrics": {key: float}, "primary": key, "n": documents scored, "lm_eval_version",
    "samples": [{"doc_id", "target", "arguments", "filtered_resps"}] when log_samples:
    lm-eval's per-document requests and filtered responses). limit: documents (int) or a fraction;
    seed: lm-eval's python/numpy/torch/few-shot seeds; include_path: a folder of local task YAMLs; manager: the
    `task_manager` to reuse (default: a new one)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    options = {"max_length": max_length} if max_length is not None else {}
    template_args = default_template_kwargs(getattr(tokenizer, "chat_template", None))
    if template_args and "chat_template_args" in inspect.signature(HFLM.__init__).parameters:
        options["chat_template_args"] = template_args
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **options)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], limit=limit, apply_chat_template=chat_template, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        task_manager=manager or TaskManager(include_path=include_path), bootstrap_iters=0,
    )
    if out is None or task not in out["results"]:
        raise ValueError(f"lm-eval returned no results for task {task!r}")
    metrics = {k: float(v) for k, v in out["results"][task].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "alias"
               and not (isinstance(v, float) and math.isnan(v))}
    result = {"task": task, "metrics": metrics, "primary": primary_metric(task, metrics),
              "n": int(out.get("n-samples", {}).get(task, {}).get("effective", 0)),
              "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
    if log_samples:
        result["samples"] = [json.loads(json.dumps({key: s[key] for key in _SAMPLE_KEYS if key in s}, default=str))
                             for s in out["samples"][task]]
    return result
