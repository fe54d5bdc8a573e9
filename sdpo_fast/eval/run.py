"""`evaluate_checkpoint`: a trained checkpoint (full model dir or LoRA adapter dir) against its base model."""
from __future__ import annotations

import dataclasses
import fnmatch
import gc
import hashlib
import importlib.util
import json
from pathlib import Path

import torch
import yaml

from .. import __version__ as sdpo_fast_version
from ..demo.assets import tiny_model_path
from ..model.generation import generate_batch
from ..train.setup import check_model_source, load_model, load_tokenizer, resolve_device, resolve_dtype
from .harness import require_lm_eval, run_lm_eval, task_manager
from .pairwise import alpaca_eval_lc_win_rate, pairwise_win_rate
from ..utils import write_text_atomic
from .results import SIDES, ResultsDir, bar_chart, markdown_table

PAIRWISE = "pairwise"


def resolve_base(checkpoint: str | Path, base: str | None) -> tuple[str, bool]:
    """(base model name or path, whether `checkpoint` is a LoRA adapter dir). Without `base`: an adapter's
    base_model_name_or_path, else the `model` of the training run's config.yaml next to the checkpoint
    (the bundled tiny model when that is null)."""
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} is not a directory")
    adapter = (ckpt / "adapter_config.json").is_file()
    if base is not None:
        return str(base), adapter
    if adapter:
        name = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if name:
            return str(name), adapter
    for config in (ckpt / "config.yaml", ckpt.parent / "config.yaml"):
        if config.is_file():
            model = (yaml.safe_load(config.read_text()) or {}).get("model")
            return (str(model) if model else str(tiny_model_path())), adapter
    raise ValueError(f"cannot tell the base model of {str(ckpt)!r}: pass base= (--base)")


class EvalModels:
    """Loads one side at a time: "base" (the base model) or "sdpo" (the checkpoint; an adapter is merged into
    a fresh copy of the base). `release()` frees the loaded one."""

    def __init__(self, checkpoint: str | Path, base: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False):
        self.checkpoint = Path(checkpoint)
        self.base, self.adapter = resolve_base(checkpoint, base)
        check_model_source(self.base, argument="--base")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.side, self.model, self.tokenizer = None, None, None

    def get(self, side: str):
        if side == self.side:
            return self.model, self.tokenizer
        self.release()
        source = self.base if side == "base" or self.adapter else str(self.checkpoint)
        model = load_model(source, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code)
        if side == "sdpo" and self.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.checkpoint)).merge_and_unload()
        has_tokenizer = (self.checkpoint / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(self.checkpoint) if side == "sdpo" and has_tokenizer else self.base,
                                   trust_remote_code=self.trust_remote_code)
        self.side, self.model, self.tokenizer = side, model.eval(), tokenizer
        return self.model, self.tokenizer

    def release(self) -> None:
        self.side = self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_FILES = ("*config.json", "*.safetensors.index.json", "tokenizer*", "*.jinja", "vocab*", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "*.model", "*.tiktoken")
"""Top-level files besides the weights that make the model what it is (configs, tokenizer, chat template)."""


def directory_fingerprint(path: str | Path) -> dict:
    """What identifies a model directory's contents without reading its weights: the resolved path, each weight
    file's size and modification time (ns), and a SHA-256 of each of its MODEL_FILES (other files, such as
    results written next to it, do not count)."""
    path = Path(path).resolve()
    files = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.name.endswith(WEIGHT_SUFFIXES):
            stat = f.stat()
            files[f.name] = [stat.st_size, stat.st_mtime_ns]
        elif any(fnmatch.fnmatch(f.name, pattern) for pattern in MODEL_FILES):
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return {"path": str(path), "files": files}


def _model_fingerprint(source: str) -> dict:
    """A local model directory's fingerprint, else the Hub id and the cached snapshot's commit when there is one."""
    if Path(source).is_dir():
        return directory_fingerprint(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    return {"hub_id": source, "snapshot": Path(cached).parent.name if isinstance(cached, str) else None}


def _folder_fingerprint(folder: str | None) -> dict | None:
    """Size and modification time of every file under a task folder (its YAMLs, scoring code, local data)."""
    if folder is None:
        return None
    root = Path(folder).resolve()
    files = [f for f in sorted(root.rglob("*")) if f.is_file() and "__pycache__" not in f.parts]
    return {"path": str(root), "files": {str(f.relative_to(root)): [f.stat().st_size, f.stat().st_mtime_ns]
                                          for f in files}}


def _judge_identity(judge) -> dict:
    """The judge's class and, for an LLM judge, its backend's class, endpoint, model and sampling settings."""
    backend = getattr(judge, "backend", None)
    identity = {"judge": type(judge).__name__}
    if backend is not None:
        identity["backend"] = type(backend).__name__
        for name in ("url", "model", "temperature", "max_tokens", "max_new_tokens", "seed"):
            value = getattr(backend, name, None)
            if isinstance(value, (str, int, float)):
                identity[name] = value
    return identity


def run_key(models: "EvalModels", include_path: str | None, lm_eval: bool) -> dict:
    """Everything besides the settings that produced a benchmark's results: the checkpoint's and the base
    model's files, the dtype and device they ran in, the task folder and the library versions (lm-eval's for
    its tasks)."""
    import transformers

    versions = {"sdpo_fast": sdpo_fast_version, "torch": torch.__version__, "transformers": transformers.__version__}
    if lm_eval:
        versions["lm_eval"] = getattr(require_lm_eval(), "__version__", "unknown")
    if models.adapter:
        import peft

        versions["peft"] = peft.__version__
    return {"checkpoint": directory_fingerprint(models.checkpoint), "base": _model_fingerprint(models.base),
            "dtype": str(models.dtype), "device": models.device.type,
            "include_path": _folder_fingerprint(include_path), "versions": versions}


def check_adapter_base(checkpoint: str | Path, base: str, trust_remote_code: bool = False) -> None:
    """ValueError, before any weights load, when the LoRA adapter in `checkpoint` does not fit `base`: a module it
    adapts is missing there, or has other input/output sizes (read from the adapter's safetensors header and the
    base model built on the meta device)."""
    weights = Path(checkpoint) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        modules = dict(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).named_modules())
    with safe_open(str(weights), "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for key, shape in shapes.items():
        for part, axis, size in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
            if part not in key:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(name)
            if module is None or getattr(module, size, None) is None:
                raise ValueError(f"the adapter in {str(checkpoint)!r} adapts {name!r}, which the base model "
                                 f"{base!r} does not have as a linear layer: pass the adapter's own base as --base")
            if getattr(module, size) != shape[axis]:
                raise ValueError(f"the adapter in {str(checkpoint)!r} was trained on a model whose {name} has "
                                 f"{size} {shape[axis]}, but the base model {base!r} has {getattr(module, size)}: "
                                 "pass the adapter's own base as --base")


def load_eval_prompts(path: str | Path) -> list[str]:
    """Held-out prompts: a .txt file (one per line), a .jsonl file or a JSON list (AlpacaEval's format) of
    objects with an "instruction" or "prompt" field."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        prompts = []
        for i, row in enumerate(rows):
            value = row.get("instruction", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path}: row {i + 1} has no non-empty 'instruction' or 'prompt' string")
            prompts.append(value)
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def _replies(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
             batch: int = 16) -> list[str]:
    out = []
    for i in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[i:i + batch]]
        out += generate_batch(model, tokenizer, chats, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed + i)
    return out


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, base: str | None = None,
                        tasks: tuple[str, ...] | list[str] = (), limit: int | float | None = None, seed: int = 0,
                        include_path: str | None = None, batch_size: int = 1, max_length: int | None = None,
                        log_samples: bool = False, prompts: list[str] | None = None, judge=None, persona=None,
                        length_control: bool = False, alpaca_eval: bool = False, max_new_tokens: int = 256,
                        temperature: float = 0.0,
                        device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                        models: EvalModels | None = None) -> list[dict]:
    """Each lm-eval task, then the pairwise win rate on `prompts` (judged by `judge`, an online.judge Judge,
    under `persona`; replies of at most max_new_tokens, greedy at temperature 0, both models with the same
    sampling seeds), for the base model and the checkpoint. Writes out_dir/<benchmark>.json as each side
    finishes, then results.md (the table) and results.png (the chart). Finished sides are not rerun when the
    stored benchmark has the same settings and `run_key` (checkpoint and base files, dtype, device, task folder,
    versions); otherwise ValueError naming what differs. Unknown tasks and an adapter that does not fit its base
    are refused before any model loads. Returns the records."""
    if tasks:
        require_lm_eval()
    if prompts is not None and judge is None:
        raise ValueError("prompts were given without a judge")
    if alpaca_eval and importlib.util.find_spec("alpaca_eval") is None:
        raise ImportError("--alpaca-eval needs the alpaca_eval package: pip install alpaca-eval "
                          "(and its annotator's API key, e.g. OPENAI_API_KEY)")
    models = models or EvalModels(checkpoint, base, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    manager = task_manager(list(tasks), include_path) if tasks else None
    if models.adapter:
        check_adapter_base(models.checkpoint, models.base, models.trust_remote_code)
    task_settings = {"limit": limit, "seed": seed, "chat_template": True, "max_length": max_length,
                     "batch_size": batch_size, "log_samples": log_samples}
    results = ResultsDir(out_dir)
    key = run_key(models, include_path, lm_eval=True) if tasks else None
    records = {task: results.load(task, "lm_eval", task_settings, key) for task in tasks}
    if prompts is not None:
        pair_settings = {"prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                         "n_prompts": len(prompts), "seed": seed, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "length_control": length_control, "alpaca_eval": alpaca_eval,
                         **_judge_identity(judge),
                         "persona": None if persona is None else dataclasses.asdict(persona)}
        records[PAIRWISE] = results.load(PAIRWISE, PAIRWISE, pair_settings, run_key(models, None, lm_eval=False))
    for side in SIDES:
        for task in tasks:
            if side not in records[task]:
                model, tokenizer = models.get(side)
                records[task][side] = run_lm_eval(model, tokenizer, task, limit=limit, seed=seed,
                                                  include_path=include_path, batch_size=batch_size,
                                                  max_length=max_length, log_samples=log_samples,
                                                  manager=manager)
                results.save(records[task])
        if prompts is not None:
            replies = records[PAIRWISE].setdefault("replies", {})
            if side not in replies and "sdpo" not in records[PAIRWISE]:
                model, tokenizer = models.get(side)
                replies[side] = _replies(model, tokenizer, prompts, max_new_tokens, temperature, seed)
                results.save(records[PAIRWISE])
    models.release()
    if prompts is not None and "sdpo" not in records[PAIRWISE]:
        record = records[PAIRWISE]
        trained, base_replies = record["replies"]["sdpo"], record["replies"]["base"]
        result = pairwise_win_rate(judge, persona, prompts, trained, base_replies,
                                   length_control=length_control, seed=seed)
        if alpaca_eval:
            result["alpaca_eval"] = alpaca_eval_lc_win_rate(prompts, trained, base_replies,
                                                            str(Path(out_dir) / "alpaca_eval"))
        record["base"], record["sdpo"] = {"win_rate": 0.5}, result
        results.save(record)
    done = results.records(list(records))
    write_text_atomic(Path(out_dir) / "results.md", markdown_table(done))
    bar_chart(done, Path(out_dir) / "results.png")
    return done
