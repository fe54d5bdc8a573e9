"""The offline SDPO trainer: `train_step` (train/step.py) over the steps of a run, with metrics, checkpoints and
exact resume. One optimizer step = `batch_size` interactions.

`train` runs the checks of train/preflight.py (each once, before the weights load), loads the model and fits.
Crash safety: checkpoints every `save_steps` steps, every `save_minutes` minutes and at the end; SIGINT/SIGTERM
finish the current step, save, and stop (`Interrupted`, exit code 130/143); `save_total_limit` rotates old
checkpoints. Resume (train/rundir.py) takes the newest intact checkpoint, or starts from step 0 when the run
directory has none yet."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ..data import EncodedInteraction
from ..utils.files import disk_error
from ..utils.signals import Interrupted, deferred_signals
from .build import (describe_counts, make_optimizer, make_scheduler, objective_of, step_order, step_options,
                    total_steps)
from .checkpoint import (is_sharded, latest_checkpoint, load_sharded_state, load_teacher_state, load_trainer_state,
                         restore_rng, rotate_checkpoints, save_checkpoint)
from .config import TrainConfig
from .distributed import World, any_rank, barrier, close_world, init_world, shard_model
from .preflight import check_launch, preflight
from .reporting import Reporters, check_reporters
from .rundir import check_fresh, check_resumable, default_output_dir, resolve_checkpoint, write_run_files
from .setup import load_model_and_tokenizer, resolve_device, resolve_dtype
from .step import train_step
from .teachers import Teacher


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trainer:
    """Runs `config` on a prepared model, tokenizer and encoded interactions, writing into config.output_dir.

    resume_from: with config.resume, the checkpoint to continue from ("latest": the newest valid one; None:
    step 0). data_counts: what the data loader read (logged with the run's start). changes: options changed
    on resume ({option: [saved, new]}), recorded. world: under torchrun, this rank (see train/distributed.py):
    the model is sharded with FSDP2 here, each step's interactions are split over the ranks, and rank 0 alone
    logs, shows progress and writes everything but the shards of checkpoints. preflighted: `train`'s checks
    have passed on this config (the output directory checked, resume_from resolved), so they are not repeated.
    fit: what --fit chose (`fit.Fit.to_json()["fit"]`), logged in the start event and the summary."""

    def __init__(self, config: TrainConfig, model, tokenizer, encoded: list[EncodedInteraction], *,
                 resume_from: Path | str | None = "latest", data_counts: dict | None = None,
                 changes: dict | None = None, log=_say, world: World | None = None, preflighted: bool = False,
                 fit: dict | None = None):
        if not encoded:
            raise ValueError("no interactions to train on")
        self.config, self.model, self.tokenizer, self.encoded = config, model, tokenizer, encoded
        self.world, self.main, self.preflighted = world, world is None or world.main, preflighted
        self.output_dir = Path(config.output_dir or default_output_dir())
        self.total_steps = total_steps(len(encoded), config)
        self.steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
        dtype = resolve_dtype(config.dtype, resolve_device(config.device))
        # the dtype one process would save its trained weights in: LoRA adapters per lora_dtype, else the model's
        self.saved_dtype = torch.float32 if config.lora_r and config.lora_dtype == "float32" else dtype
        self.runner = model if world is None else self._sharded(dtype)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps)
        self.objective, self.step_options = objective_of(config), step_options(config)
        self.teacher = Teacher(model, config.teacher, config.teacher_ema_rate) if self.objective.needs_teacher \
            else None
        self.step = 0
        self.resume_from = resume_from if config.resume else None
        self.data_counts, self.changes, self.log, self.fit_choice = data_counts, dict(changes or {}), log, fit
        self._saved_step, self._last_save = None, time.monotonic()

    def _sharded(self, dtype: torch.dtype):
        low = sorted({str(p.dtype) for p in self.model.parameters() if p.requires_grad and p.dtype != torch.float32})
        if low:
            raise ValueError(f"under torchrun the trained weights must be float32 (FSDP2 computes in --dtype and "
                             f"keeps the fp32 shards as master weights); this model trains {low} parameters")
        return shard_model(self.model, param_dtype=None if dtype == torch.float32 else dtype,
                           reduce_dtype=torch.float32)

    def _start(self) -> None:
        """The run's start: the checkpoint restored, the run files written, the seed set, the notes logged."""
        if not self.preflighted:
            check_reporters(self.config.report_to)
            if self.resume_from == "latest":
                self.resume_from = resolve_checkpoint(self.output_dir, self.world, self.log)
            elif self.resume_from is not None:
                check_resumable(Path(self.resume_from), self.world)
        if self.resume_from is not None:
            self._restore(Path(self.resume_from))
        if self.main:
            if not (self.preflighted or self.config.resume):
                check_fresh(self.output_dir)
            write_run_files(self.output_dir, self.config, self.step, self.resume_from, self.changes,
                            self.data_counts, self.log, self.fit_choice)
        if self.world is not None:
            barrier()
        if self.resume_from is None:
            torch.manual_seed(self.config.seed)
        if not self.main:
            self.log = lambda message: None
        if self.data_counts is not None:
            self.log(describe_counts(self.data_counts))
        if self.changes:
            self.log("resume: applied changed options " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changes.items()))
        self.model.train()

    def _position(self) -> dict:
        return {"num_interactions": len(self.encoded), "total_steps": self.total_steps, "seed": self.config.seed,
                "batch_size": self.config.batch_size, "shuffle": self.config.shuffle}

    def _restore(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        saved, now = state["extra"], self._position()
        differ = {k: (saved.get(k), now[k]) for k in ("num_interactions", "seed", "batch_size", "shuffle")
                  if saved.get(k) != now[k]}
        if differ:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differ.items())
            raise ValueError(f"resume: checkpoint {str(ckpt)!r} belongs to another run ({listed}); the data or its "
                             "settings changed: use the same data, or start a new run in another --output-dir")
        world_sizes = [state.get("world_size", 1), 1 if self.world is None else self.world.size]
        if world_sizes[0] != world_sizes[1]:
            self.changes["world_size"] = world_sizes
        if is_sharded(ckpt):
            load_sharded_state(ckpt, self.model, self.optimizer, self.world,
                               self.teacher.ema if self.teacher is not None else None)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule's shape comes from this run's options (total steps may have changed), its peak lr and the
        # weight decay from this run's config: the saved optimizer's values are replaced.
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * factor(self.scheduler.last_epoch)
            group["weight_decay"] = self.config.weight_decay
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if not is_sharded(ckpt):  # else restored with the shards, above
            restore_rng(state)
            if self.teacher is not None:
                self.teacher.load_state_dict(load_teacher_state(ckpt))
        self.step = self._saved_step = state["step"]

    def save(self) -> Path:
        path = save_checkpoint(self.output_dir, self.step, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, self._position(),
                               teacher_state=self.teacher.state_dict() if self.teacher is not None else None,
                               world=self.world, weights_dtype=self.saved_dtype)
        self._saved_step, self._last_save = self.step, time.monotonic()
        if self.config.save_total_limit and self.main:
            rotate_checkpoints(self.output_dir, self.config.save_total_limit, path)
        return path

    def batches(self):
        """(step, interactions) from the current step on; the order depends only on seed, epoch and step."""
        for step in range(self.step, self.total_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            order = step_order(len(self.encoded), self.config.batch_size, epoch, self.config.seed,
                               self.config.shuffle)
            yield step, [self.encoded[i] for i in order[index]]

    def _due(self) -> bool:
        cfg = self.config
        return bool((cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == self.total_steps
                    or (cfg.save_minutes and time.monotonic() - self._last_save >= cfg.save_minutes * 60))

    def _agreed(self, interrupted: bool, due: bool) -> tuple[bool, bool]:
        """(interrupted, save due) as every rank will act on them: OR-ed over the ranks under torchrun (a signal
        or the save clock may reach the ranks at different steps)."""
        if self.world is None:
            return interrupted, due
        interrupted, due = any_rank([interrupted, due], self.optimizer.param_groups[0]["params"][0].device)
        return interrupted, due

    def _interrupt(self, signum: int) -> Interrupted:
        name = signal.Signals(signum).name
        if self.step and self._saved_step != self.step:
            self.save()
        saved = f"saved checkpoint-{self.step}" if self.step else "nothing to save yet"
        return Interrupted(f"interrupted by {name} at step {self.step}/{self.total_steps}; {saved}; continue with "
                           f"--output-dir {str(self.output_dir)} --resume", signum)

    def _train_step(self, step: int, batch: list[EncodedInteraction]) -> dict:
        """One optimizer step over `batch` (step `step`, 0-based); its metrics.jsonl line. ValueError when the
        loss is not finite."""
        t0, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
        stats = train_step(self.runner, batch, self.objective, self.optimizer, self.scheduler, self.step_options,
                           teacher=self.teacher, world=self.world)
        self.step, seconds = step + 1, time.perf_counter() - t0
        if not math.isfinite(stats.loss):
            raise ValueError(f"the loss is {stats.loss} at step {self.step} (non-finite weights, activations or "
                             "data); lower --lr, or resume from an earlier checkpoint")
        signal_name = self.objective.signal_name
        line = {"step": self.step, "epoch": step // self.steps_per_epoch, "loss": stats.loss,
                signal_name: stats.mean_signal,
                "positive_advantage_share": stats.positive_share if signal_name == "mean_advantage" else None,
                "grad_norm": stats.grad_norm, "lr": lr, "interactions": len(batch), "tokens": stats.tokens,
                "loss_tokens": stats.loss_tokens, "tokens_per_s": stats.tokens / seconds, "seconds": seconds}
        if torch.cuda.is_available():
            line["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return line

    @contextlib.contextmanager
    def _metric_sinks(self, progress: bool):
        """`log(line)`: a step's metrics to metrics.jsonl, the reporters and the progress bar (rank 0 only); a
        full disk or another OS error of the block becomes one line (`disk_error`)."""
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"sdpo-fast train ({self.config.loss})",
                   unit="step", disable=not (progress and self.main), dynamic_ncols=True)
        reporters = Reporters(self.config.report_to if self.main else [], self.output_dir, self.config.to_dict())
        try:
            with open(self.output_dir / "metrics.jsonl", "a") if self.main else open(os.devnull, "w") as metrics:
                def log(line: dict) -> None:
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    reporters.log(line, self.step)
                    if self.step % self.config.logging_steps == 0:
                        bar.set_postfix(_postfix(line), refresh=False)
                    bar.update()

                yield log
        except OSError as exc:
            mapped = disk_error(exc, getattr(exc, "filename", None) or self.output_dir)
            raise (mapped or exc) from None
        finally:
            bar.close()
            reporters.close()

    def fit(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train to total_steps (or stop after step `stop_after`, as a crash would); returns a summary.
        SIGINT/SIGTERM: the current step finishes, a checkpoint is saved, and `Interrupted` is raised."""
        lines = []
        with deferred_signals() as signals:
            self._start()
            start = time.perf_counter()
            with self._metric_sinks(progress) as log:
                stop = self._agreed(signals.received is not None, False)[0]
                for step, batch in self.batches():
                    if stop:
                        raise self._interrupt(signals.received or signal.SIGTERM)
                    lines.append(self._train_step(step, batch))
                    log(lines[-1])
                    stop, due = self._agreed(signals.received is not None, self._due())
                    if due:
                        self.save()
                    if stop_after is not None and self.step >= stop_after:
                        break
        return self._summary(lines, time.perf_counter() - start)

    def _summary(self, lines: list[dict], elapsed: float) -> dict:
        tokens = sum(line["tokens"] for line in lines)
        return {"steps": self.step, "total_steps": self.total_steps, "interactions": len(self.encoded),
                "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "first": lines[0] if lines else None, "last": lines[-1] if lines else None,
                "output_dir": str(self.output_dir), "checkpoint": str(latest_checkpoint(self.output_dir) or ""),
                "data": self.data_counts, "changed": self.changes, "fit": self.fit_choice}


def _postfix(metrics: dict) -> dict:
    out = {"loss": f"{metrics['loss']:.4g}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if "mean_divergence" in metrics:
        out["div"] = f"{metrics['mean_divergence']:.3f}"
    elif metrics.get("positive_advantage_share") is not None:
        out["adv"] = f"{metrics['mean_advantage']:+.3f}"
        out["adv>0"] = f"{metrics['positive_advantage_share']:.0%}"
    else:
        out["nll"] = f"{metrics['mean_nll']:.3f}"
    if "peak_memory_gib" in metrics:
        out["mem"] = f"{metrics['peak_memory_gib']:.1f}G"
    return out


def train(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None, log=_say,
          fit: dict | None = None) -> dict:
    """Check `config`, the output directory, backends, model directory and tokenizer; load and encode the data;
    then load the model (from the newest valid checkpoint when resuming) and fit.

    Everything is checked (train/preflight.py, each check once), and the data encoded, before the weights load
    and before anything is written to the output directory. `log` receives the one-line notes (data counts,
    warnings); default stderr. fit: what --fit chose for `config` (logged with the run's start and in the summary).
    """
    world = check_launch(config)
    if world is not None:
        world = init_world(resolve_device(config.device), config.dist_timeout_minutes)
        log = log if world.main else (lambda message: None)
    try:
        return _train(config, world, progress, stop_after, log, fit)
    finally:
        if world is not None:
            close_world()


def _train(config: TrainConfig, world: World | None, progress: bool, stop_after: int | None, log,
           fit: dict | None) -> dict:
    checked = preflight(config, world, log)
    ckpt = checked.run.checkpoint
    if world is None:
        model, tokenizer = load_model_and_tokenizer(config, ckpt, tokenizer=checked.tokenizer)
    else:  # every rank loads on the CPU, FSDP2 keeps its shard on its device; trained weights stay fp32 (masters)
        barrier()
        model, tokenizer = load_model_and_tokenizer(dataclasses.replace(config, lora_dtype="float32"), ckpt,
                                                    device=torch.device("cpu"),
                                                    dtype=None if config.lora_r else torch.float32,
                                                    tokenizer=checked.tokenizer)
    trainer = Trainer(config, model, tokenizer, checked.encoded, resume_from=ckpt, data_counts=checked.counts,
                      changes=checked.run.changes, log=log, world=world, preflighted=True, fit=fit)
    return trainer.fit(progress=progress, stop_after=stop_after)
