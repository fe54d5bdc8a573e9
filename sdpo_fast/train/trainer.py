"""The offline SDPO trainer: `train_step` (train/step.py) over the steps of a run, with metrics, checkpoints and
exact resume. One optimizer step = `batch_size` interactions."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch

from ..data import EncodedInteraction, encode_interactions, load_interactions
from ..demo.assets import tiny_model_path, tiny_sample_path
from ..loss import Objective, make_objective
from ..utils.files import write_text_atomic
from .checkpoint import STALE_PATTERNS, latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint
from .config import TrainConfig, save_config
from .optim import OptimizerInBackward, offload_optimizer
from .reporting import Reporters, check_reporters
from .setup import NO_BNB, build_optimizer, build_scheduler, importable, load_model_and_tokenizer, resolve_device
from .step import StepOptions, train_step

def step_order(n_interactions: int, batch_size: int, epoch: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Interaction indices of each step of `epoch` (the last step may be short); depends only on the arguments."""
    if shuffle:
        order = torch.randperm(n_interactions, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n_interactions)
    order = order.tolist()
    return [order[i:i + batch_size] for i in range(0, n_interactions, batch_size)]


def total_steps(n_interactions: int, config: TrainConfig) -> int:
    return config.max_steps or config.epochs * math.ceil(n_interactions / config.batch_size)


def objective_of(config: TrainConfig) -> Objective:
    """The objective `config.loss` names, with its options."""
    if config.loss == "sft":
        return make_objective("sft")
    return make_objective("sdpo", temperature=config.temperature, signal_clip=config.signal_clip,
                          backend=config.loss_backend)


def make_optimizer(params: list, config: TrainConfig):
    """The optimizer `config` names over `params`: plain, stepped in backward, or offloaded to the CPU."""
    if config.offload_optimizer:
        return offload_optimizer(params, config.optimizer, config.lr, config.weight_decay)
    if config.optimizer_in_backward:
        return OptimizerInBackward(params, lambda ps: build_optimizer(ps, config.optimizer, config.lr,
                                                                      config.weight_decay), config.max_grad_norm)
    return build_optimizer(params, config.optimizer, config.lr, config.weight_decay)


def step_options(config: TrainConfig) -> StepOptions:
    return StepOptions(micro_batch_tokens=config.micro_batch_tokens, ignore_first_k=config.ignore_first_k,
                       aggregation=config.aggregation, max_grad_norm=config.max_grad_norm,
                       prefix_reuse=config.prefix_reuse, attn_backend=config.attn_backend)


def load_encoded_data(config: TrainConfig, tokenizer) -> tuple[list[EncodedInteraction], dict]:
    """Encoded interactions of `config.data` (default: the bundled tiny_sample.jsonl) and counts of what was
    skipped."""
    source = config.data if config.data is not None else tiny_sample_path()
    stream = load_interactions(source, max_history=config.max_history, preset=config.data_preset)
    encoded, skipped = encode_interactions(tokenizer, stream, max_prompt_tokens=config.max_prompt_tokens,
                                           max_completion_tokens=config.max_completion_tokens)
    skipped = {**dict(stream.skipped), **dict(skipped)}
    if not encoded:
        raise ValueError(f"data {str(source)!r} gave zero usable interactions (skipped: {skipped or 'none'}; "
                         f"bad rows: {len(stream.bad_rows)})")
    return encoded, skipped


def default_output_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("sdpo-%Y%m%d-%H%M%S"))


class Trainer:
    """Runs `config` on a prepared model, tokenizer and encoded interactions, writing into config.output_dir."""

    def __init__(self, config: TrainConfig, model, tokenizer, encoded: list[EncodedInteraction]):
        if not encoded:
            raise ValueError("no interactions to train on")
        self.config, self.model, self.tokenizer, self.encoded = config, model, tokenizer, encoded
        self.output_dir = Path(config.output_dir or default_output_dir())
        self.total_steps = total_steps(len(encoded), config)
        self.steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.warmup_ratio, self.total_steps)
        self.objective, self.step_options = objective_of(config), step_options(config)
        self.step = 0

    def _prepare_output_dir(self) -> None:
        if self.config.resume:
            ckpt = latest_checkpoint(self.output_dir)
            if ckpt is None:
                raise ValueError(f"resume: no checkpoint in {str(self.output_dir)!r}")
            self._restore(ckpt)
        elif self.output_dir.exists() and any(self.output_dir.iterdir()):
            raise ValueError(f"output_dir {str(self.output_dir)!r} is not empty; pass --resume to continue its run "
                             "or choose another --output-dir")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for pattern in STALE_PATTERNS:
            for stale in self.output_dir.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        save_config(self.config, self.output_dir / "config.yaml")
        metrics = self.output_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        write_text_atomic(metrics, "".join(line + "\n" for line in lines if _logged_step(line) <= self.step))

    def _position(self) -> dict:
        return {"num_interactions": len(self.encoded), "total_steps": self.total_steps, "seed": self.config.seed,
                "batch_size": self.config.batch_size, "shuffle": self.config.shuffle}

    def _restore(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        if state["extra"] != self._position():
            raise ValueError(f"resume: checkpoint {str(ckpt)!r} was written for {state['extra']}, but this run has "
                             f"{self._position()}; use the same data and settings")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state)
        self.step = state["step"]

    def save(self) -> Path:
        return save_checkpoint(self.output_dir, self.step, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, self._position())

    def batches(self):
        """(step, interactions) from the current step on; the order depends only on seed, epoch and step."""
        for step in range(self.step, self.total_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            order = step_order(len(self.encoded), self.config.batch_size, epoch, self.config.seed,
                               self.config.shuffle)
            yield step, [self.encoded[i] for i in order[index]]

    def fit(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train to total_steps (or stop after step `stop_after`, as a crash would); returns a summary."""
        from tqdm import tqdm

        if not self.config.resume:
            torch.manual_seed(self.config.seed)
        self._prepare_output_dir()
        self.model.train()
        cfg, start, first, last = self.config, time.perf_counter(), None, None
        tokens = 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"sdpo-fast train ({cfg.loss})", unit="step",
                   disable=not progress, dynamic_ncols=True)
        reporters = Reporters(cfg.report_to, self.output_dir, cfg.to_dict())
        with open(self.output_dir / "metrics.jsonl", "a") as metrics:
            for step, batch in self.batches():
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                stats = train_step(self.model, batch, self.objective, self.optimizer, self.scheduler,
                                   self.step_options)
                self.step, seconds = step + 1, time.perf_counter() - t0
                tokens += stats.tokens
                last = {"step": self.step, "epoch": step // self.steps_per_epoch, "loss": stats.loss,
                        self.objective.signal_name: stats.mean_signal,
                        "positive_advantage_share": stats.positive_share if cfg.loss == "sdpo" else None,
                        "grad_norm": stats.grad_norm, "lr": lr, "interactions": len(batch), "tokens": stats.tokens,
                        "loss_tokens": stats.loss_tokens, "tokens_per_s": stats.tokens / seconds, "seconds": seconds}
                if torch.cuda.is_available():
                    last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                first = first or last
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                reporters.log(last, self.step)
                if self.step % cfg.logging_steps == 0:
                    bar.set_postfix(_postfix(last), refresh=False)
                bar.update()
                if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == self.total_steps:
                    self.save()
                if stop_after is not None and self.step >= stop_after:
                    break
        bar.close()
        reporters.close()
        elapsed = time.perf_counter() - start
        return {"steps": self.step, "total_steps": self.total_steps, "interactions": len(self.encoded),
                "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "first": first, "last": last, "output_dir": str(self.output_dir),
                "checkpoint": str(latest_checkpoint(self.output_dir) or "")}


def _logged_step(line: str) -> float:
    """The step of a metrics line; inf for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _postfix(metrics: dict) -> dict:
    out = {"loss": f"{metrics['loss']:.4g}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if metrics.get("positive_advantage_share") is not None:
        out["adv"] = f"{metrics['mean_advantage']:+.3f}"
        out["adv>0"] = f"{metrics['positive_advantage_share']:.0%}"
    else:
        out["nll"] = f"{metrics['mean_nll']:.3f}"
    if "peak_memory_gib" in metrics:
        out["mem"] = f"{metrics['peak_memory_gib']:.1f}G"
    return out


def check_memory(config: TrainConfig) -> None:
    """Before any CUDA allocation: expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set; on CUDA, with
    check_memory, the simulated step against the card's free memory (see `plan.check_fits`)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if resolve_device(config.device).type != "cuda":
        return
    if config.check_memory and not config.load_in_4bit:
        from .plan import check_fits

        check_fits(dataclasses.replace(config, model=config.model or str(tiny_model_path())),
                   torch.cuda.mem_get_info()[0])


def train(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Load model, tokenizer and data for `config` (resuming from output_dir's latest checkpoint if asked) and fit.

    Everything is loaded and checked before anything is written to the output directory.
    """
    config.validate()
    if config.output_dir is None:
        config.output_dir = default_output_dir()
    ckpt = latest_checkpoint(config.output_dir) if config.resume else None
    if config.resume and ckpt is None:
        raise ValueError(f"resume: no checkpoint in {config.output_dir!r}")
    if config.optimizer == "adamw8bit" and not importable("bitsandbytes"):
        raise ValueError(NO_BNB)
    check_reporters(config.report_to)
    check_memory(config)
    model, tokenizer = load_model_and_tokenizer(config, ckpt)
    encoded, _ = load_encoded_data(config, tokenizer)
    return Trainer(config, model, tokenizer, encoded).fit(progress=progress, stop_after=stop_after)
