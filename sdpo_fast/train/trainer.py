"""The offline SDPO trainer: `train_step` (train/step.py) over the steps of a run, with metrics, checkpoints and
exact resume. One optimizer step = `batch_size` interactions.

Crash safety: checkpoints every `save_steps` steps, every `save_minutes` minutes and at the end; SIGINT/SIGTERM
finish the current step, save, and stop (`Interrupted`, exit code 130/143); `save_total_limit` rotates old
checkpoints. Resume takes the newest checkpoint whose files match their recorded sizes and hashes (warning about
newer broken ones), or starts from step 0 when the run directory has none yet. Options in `FIXED_ON_RESUME`
cannot differ from the run's config.yaml; the others are applied and recorded (metrics.jsonl "start" events and
config_history.jsonl)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..data import EncodedInteraction, encode_interactions, load_interactions
from ..demo.assets import tiny_model_path, tiny_sample_path
from ..loss import Objective, distillation_objective, make_objective, resolve_backend
from ..model.attention import check_backend as check_attn_backend
from ..model.support import check_model_name
from ..utils.files import disk_error, write_text_atomic
from ..utils.signals import Interrupted, deferred_signals
from .checkpoint import (STALE_PATTERNS, checkpoint_dirs, checkpoint_problem, is_sharded, latest_checkpoint,
                         latest_valid_checkpoint, load_sharded_state, load_teacher_state, load_trainer_state,
                         restore_rng, rotate_checkpoints, save_checkpoint)
from .config import TrainConfig, load_yaml, save_config
from .distributed import (World, any_rank, barrier, broadcast_object, check_distributed, close_world, init_world,
                          launched_world, shard_model)
from .optim import OptimizerInBackward, offload_optimizer
from .reporting import Reporters, check_reporters
from .setup import NO_BNB, build_optimizer, build_scheduler, importable, load_model_and_tokenizer, load_tokenizer
from .setup import check_model_options, check_model_source, resolve_device, resolve_dtype
from .step import StepOptions, train_step
from .teachers import Teacher

CHANGEABLE_ON_RESUME = ("lr", "epochs", "max_steps", "weight_decay", "max_grad_norm", "micro_batch_tokens",
                        "save_steps", "save_minutes", "save_total_limit", "logging_steps", "report_to",
                        "gradient_checkpointing", "prefix_reuse", "attn_backend", "loss_backend", "device",
                        "use_liger", "dist_timeout_minutes")
"""Options `--resume` may change: applied from the resumed step on (lr and weight_decay replace the saved
optimizer's; epochs/max_steps re-shape the schedule to the new total) and recorded."""
NOT_COMPARED_ON_RESUME = ("output_dir", "resume", "preset")
"""Every other option (model, data, data filters and token limits, seed, shuffle, batch_size, loss, aggregation,
ignore_first_k, temperature, signal_clip, importance_clip, optimizer, schedule, warmup_ratio, LoRA settings, dtype,
load_in_4bit, trust_remote_code, and any option added later) is fixed: a resume that changes one is refused."""
_PROBE = "Hello, world"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    return distillation_objective(config.distillation_mode, temperature=config.temperature,
                                  alpha=config.distillation_alpha, topk=config.distillation_topk,
                                  add_tail=config.distillation_add_tail, signal_clip=config.signal_clip,
                                  importance_clip=config.importance_clip,
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
    """Encoded interactions of `config.data` (default: the bundled tiny_sample.jsonl) and what was read: rows,
    conversations, interactions, encoded, skipped (reason -> count), bad_rows (count) and the first bad rows'
    locations ("file:number: reason")."""
    source = config.data if config.data is not None else tiny_sample_path()
    stream = load_interactions(source, max_history=config.max_history, preset=config.data_preset)
    encoded, skipped = encode_interactions(tokenizer, stream, max_prompt_tokens=config.max_prompt_tokens,
                                           max_completion_tokens=config.max_completion_tokens,
                                           hindsight_template=config.hindsight_template,
                                           prompt_truncation=config.prompt_truncation)
    stats = stream.stats
    skipped = {**dict(stats.skipped), **dict(skipped)}
    counts = {"rows": stats.rows, "conversations": stats.conversations, "interactions": stats.interactions,
              "encoded": len(encoded), "skipped": skipped,
              "bad_rows": sum(skipped.get(reason, 0) for reason in {b.reason for b in stats.bad_rows}),
              "first_bad_rows": [f"{b.file}:{b.number}: {b.reason}" for b in stats.bad_rows[:5]]}
    if not encoded:
        raise ValueError(f"data {str(source)!r} gave zero usable interactions (skipped: {skipped or 'none'}; "
                         f"bad rows: {len(stats.bad_rows)})")
    empty = sum(1 for e in encoded if not e.student_prompt_len or not e.completion_ids)
    if empty:
        raise ValueError(f"data {str(source)!r}: {empty} interactions encode to zero prompt or completion tokens; "
                         "the tokenizer does not encode this text (check the model directory's tokenizer files)")
    return encoded, counts


def check_behavior_logprobs(config: TrainConfig, encoded: list[EncodedInteraction]) -> None:
    """With importance_clip, ValueError unless every encoded interaction has the sampler's log-probs."""
    if config.importance_clip is None:
        return
    missing = sum(e.behavior_logprobs is None for e in encoded)
    if missing:
        raise ValueError(f"importance_clip needs the sampler's log-probs of every completion, but {missing} of the "
                         f"{len(encoded)} encoded interactions have none: give each assistant message \"token_ids\" "
                         "and \"logprobs\" (one per token, as a vLLM/TRL rollout log holds them), or unset "
                         "importance_clip")


def describe_counts(counts: dict) -> str:
    """One line: rows/interactions read, used, skipped and why."""
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(counts["skipped"].items(), key=lambda kv: -kv[1]))
    line = (f"data: {counts['rows']} rows read, {counts['conversations']} conversations, "
            f"{counts['interactions']} interactions, {counts['encoded']} encoded; skipped: {skipped or 'none'}")
    if counts["first_bad_rows"]:
        line += f"; first bad rows: {'; '.join(counts['first_bad_rows'][:3])}"
    return line


def check_tokenizer(tokenizer, name: str) -> None:
    """ValueError unless `tokenizer` encodes text to tokens and its chat template round-trips a message."""
    if not tokenizer.encode(_PROBE, add_special_tokens=False):
        raise ValueError(f"model {name!r}: its tokenizer encodes text to zero tokens (tokenizer files missing or "
                         "broken); use a model directory with tokenizer.json (or tokenizer.model)")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model {name!r}: its tokenizer has no chat template; use an instruct/chat model")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids)
    except Exception as exc:  # a template that cannot render is reported with its error, as one line
        raise ValueError(f"model {name!r}: its chat template fails ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if _PROBE not in back:
        raise ValueError(f"model {name!r}: its tokenizer cannot round-trip the chat template (a message encoded "
                         "and decoded does not come back); check its tokenizer files")


def check_output_dir(path: Path, resume: bool) -> None:
    """ValueError naming --output-dir when it cannot hold this run (a file, under a file, not writable, a
    finished/foreign non-empty directory without --resume, a missing directory with --resume)."""
    shown = str(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {shown!r} is a file; pass a directory path to --output-dir")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output_dir {shown!r} is under the file {str(parent)!r}; choose another --output-dir")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".sdpo-write-check"):
            pass
    except OSError as exc:
        mapped = disk_error(exc, parent)
        raise ValueError(f"output_dir {shown!r}: "
                         f"{mapped if mapped is not None else f'cannot write {str(parent)!r} ({exc.strerror})'}"
                         ) from None
    if resume:
        if not path.is_dir():
            raise ValueError(f"resume: {shown!r} does not exist, so there is no checkpoint to resume; "
                             "drop --resume to start a new run there")
        if any(_entries(path)) and not (path / "config.yaml").is_file() and not checkpoint_dirs(path):
            raise ValueError(f"resume: {shown!r} is not a run directory (no config.yaml, no checkpoint)")
    elif path.is_dir() and any(_entries(path)):
        raise ValueError(f"output_dir {shown!r} is not empty; pass --resume to continue its run "
                         "or choose another --output-dir")


def _entries(path: Path):
    return (p for p in path.iterdir() if not any(p.match(pattern) for pattern in STALE_PATTERNS))


def resume_changes(config: TrainConfig, output_dir: Path) -> dict:
    """{option: [saved, new]} of the options `config` changes from output_dir/config.yaml (all changeable);
    ValueError listing the fixed options that differ."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        return {}
    saved = load_yaml(saved_path)
    current = config.to_dict()
    changed = {key: [saved[key], current[key]] for key in current
               if key in saved and key not in NOT_COMPARED_ON_RESUME and not _same(saved[key], current[key])}
    fixed = {key: pair for key, pair in changed.items() if key not in CHANGEABLE_ON_RESUME}
    if fixed:
        listed = "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, (old, new) in fixed.items())
        raise ValueError(f"resume: these options cannot change in a resumed run ({listed}); drop them, or start a "
                         f"new run in another --output-dir")
    return changed


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_backends(config: TrainConfig) -> None:
    """ValueError naming loss_backend/attn_backend when it cannot run on the configured device (attention: in the
    configured dtype, on that GPU's compute capability), before weights load."""
    device = resolve_device(config.device)
    if config.loss == "sdpo":
        try:
            resolve_backend(config.loss_backend, device)
        except ValueError as exc:
            raise ValueError(f"loss_backend {config.loss_backend!r} cannot run on {device.type}: {exc}") from None
    check_attn_backend(config.attn_backend, device, resolve_dtype(config.dtype, device))


def model_check_options(config: TrainConfig) -> dict:
    """`check_model_name`'s options for the model of `config`: its attention backend, device and dtype."""
    device = resolve_device(config.device)
    return dict(attn_backend=config.attn_backend, device=device, dtype=resolve_dtype(config.dtype, device),
                trust_remote_code=config.trust_remote_code)


def default_output_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("sdpo-%Y%m%d-%H%M%S"))


class Trainer:
    """Runs `config` on a prepared model, tokenizer and encoded interactions, writing into config.output_dir.

    resume_from: with config.resume, the checkpoint to continue from ("latest": the newest valid one; None:
    step 0). data_counts: what the data loader read (logged with the run's start). changes: options changed
    on resume ({option: [saved, new]}), recorded. world: under torchrun, this rank (see train/distributed.py):
    the model is sharded with FSDP2 here, each step's interactions are split over the ranks, and rank 0 alone
    logs, shows progress and writes everything but the shards of checkpoints."""

    def __init__(self, config: TrainConfig, model, tokenizer, encoded: list[EncodedInteraction], *,
                 resume_from: Path | str | None = "latest", data_counts: dict | None = None,
                 changes: dict | None = None, log=_say, world: World | None = None):
        if not encoded:
            raise ValueError("no interactions to train on")
        self.config, self.model, self.tokenizer, self.encoded = config, model, tokenizer, encoded
        self.world, self.main = world, world is None or world.main
        self.output_dir = Path(config.output_dir or default_output_dir())
        self.total_steps = total_steps(len(encoded), config)
        self.steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
        dtype = resolve_dtype(config.dtype, resolve_device(config.device))
        # the dtype one process would save its trained weights in: LoRA adapters per lora_dtype, else the model's
        self.saved_dtype = torch.float32 if config.lora_r and config.lora_dtype == "float32" else dtype
        if world is not None:
            check_distributed(config)
            low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
            if low:
                raise ValueError(f"under torchrun the trained weights must be float32 (FSDP2 computes in --dtype and "
                                 f"keeps the fp32 shards as master weights); this model trains {low} parameters")
            compute = None if dtype == torch.float32 else dtype
            self.runner = shard_model(model, param_dtype=compute, reduce_dtype=torch.float32)
        else:
            self.runner = model
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.warmup_ratio, self.total_steps)
        self.objective, self.step_options = objective_of(config), step_options(config)
        self.teacher = Teacher(model, config.teacher, config.teacher_ema_rate) if self.objective.needs_teacher \
            else None
        self.step = 0
        self.resume_from = resume_from if config.resume else None
        self.data_counts, self.changes, self.log = data_counts, dict(changes or {}), log
        self._saved_step, self._last_save = None, time.monotonic()

    def _prepare_output_dir(self) -> None:
        if self.resume_from == "latest":
            found = latest_valid_checkpoint(self.output_dir, warn=lambda m: self.log(f"warning: {m}")) \
                if self.main else None
            self.resume_from = found if self.world is None else broadcast_object(found)
        if self.resume_from is not None:
            self._restore(Path(self.resume_from))
        if self.main:
            self._write_run_files()
        if self.world is not None:
            barrier()

    def _write_run_files(self) -> None:
        if self.config.resume:
            self._set_aside_newer_checkpoints()
        elif self.output_dir.exists() and any(_entries(self.output_dir)):
            raise ValueError(f"output_dir {str(self.output_dir)!r} is not empty; pass --resume to continue its run "
                             "or choose another --output-dir")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for pattern in STALE_PATTERNS:
            for stale in self.output_dir.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        save_config(self.config, self.output_dir / "config.yaml")
        metrics = self.output_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        event = {"event": "start", "step": self.step,
                 "resumed_from": str(self.resume_from) if self.resume_from is not None else None,
                 "changed": self.changes, "data": self.data_counts}
        kept = [line for line in lines if _logged_step(line) <= self.step]
        write_text_atomic(metrics, "".join(line + "\n" for line in kept) + json.dumps(event) + "\n")
        history = self.output_dir / "config_history.jsonl"
        previous = history.read_text() if history.exists() else ""
        record = {"step": self.step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "resumed_from": event["resumed_from"], "changed": self.changes}
        write_text_atomic(history, previous + json.dumps(record) + "\n")

    def _set_aside_newer_checkpoints(self) -> None:
        """Checkpoints after the resumed step (or all, resuming from step 0) failed verification; renamed
        NAME.corrupt so that neither resume nor rotation takes them."""
        for path in checkpoint_dirs(self.output_dir):
            if int(path.name.split("-")[1]) > self.step and checkpoint_problem(path) is not None:
                target = path.with_name(path.name + ".corrupt")
                shutil.rmtree(target, ignore_errors=True)
                path.rename(target)
                self.log(f"warning: set {str(path)!r} aside as {target.name}")

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
        check_resumable(ckpt, self.world)
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

    def fit(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train to total_steps (or stop after step `stop_after`, as a crash would); returns a summary.
        SIGINT/SIGTERM: the current step finishes, a checkpoint is saved, and `Interrupted` is raised."""
        from tqdm import tqdm

        with deferred_signals() as signals:
            self._prepare_output_dir()
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
            cfg, start, first, last = self.config, time.perf_counter(), None, None
            tokens = 0
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"sdpo-fast train ({cfg.loss})",
                       unit="step", disable=not (progress and self.main), dynamic_ncols=True)
            reporters = Reporters(cfg.report_to if self.main else [], self.output_dir, cfg.to_dict())
            try:
                with open(self.output_dir / "metrics.jsonl", "a") if self.main else open(os.devnull, "w") as metrics:
                    stop = self._agreed(signals.received is not None, False)[0]
                    for step, batch in self.batches():
                        if stop:
                            raise self._interrupt(signals.received or signal.SIGTERM)
                        t0 = time.perf_counter()
                        lr = self.scheduler.get_last_lr()[0]
                        stats = train_step(self.runner, batch, self.objective, self.optimizer, self.scheduler,
                                           self.step_options, teacher=self.teacher, world=self.world)
                        self.step, seconds = step + 1, time.perf_counter() - t0
                        if not math.isfinite(stats.loss):
                            raise ValueError(f"the loss is {stats.loss} at step {self.step} (non-finite weights, "
                                             "activations or data); lower --lr, or resume from an earlier "
                                             "checkpoint")
                        tokens += stats.tokens
                        last = {"step": self.step, "epoch": step // self.steps_per_epoch, "loss": stats.loss,
                                self.objective.signal_name: stats.mean_signal,
                                "positive_advantage_share": stats.positive_share
                                if self.objective.signal_name == "mean_advantage" else None,
                                "grad_norm": stats.grad_norm, "lr": lr, "interactions": len(batch),
                                "tokens": stats.tokens, "loss_tokens": stats.loss_tokens,
                                "tokens_per_s": stats.tokens / seconds, "seconds": seconds}
                        if torch.cuda.is_available():
                            last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                        first = first or last
                        metrics.write(json.dumps(last) + "\n")
                        metrics.flush()
                        reporters.log(last, self.step)
                        if self.step % cfg.logging_steps == 0:
                            bar.set_postfix(_postfix(last), refresh=False)
                        bar.update()
                        stop, due = self._agreed(signals.received is not None, self._due())
                        if due:
                            self.save()
                        if stop_after is not None and self.step >= stop_after:
                            break
            except OSError as exc:
                mapped = disk_error(exc, getattr(exc, "filename", None) or self.output_dir)
                raise (mapped or exc) from None
            finally:
                bar.close()
                reporters.close()
        elapsed = time.perf_counter() - start
        return {"steps": self.step, "total_steps": self.total_steps, "interactions": len(self.encoded),
                "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "first": first, "last": last, "output_dir": str(self.output_dir),
                "checkpoint": str(latest_checkpoint(self.output_dir) or ""), "data": self.data_counts,
                "changed": self.changes}


def _logged_step(line: str) -> float:
    """The step of a metrics line; inf for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


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


def check_memory(config: TrainConfig) -> None:
    """Before any CUDA allocation: expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set; on CUDA, with
    check_memory, the simulated step against the card's free memory (see `plan.check_fits`; one process only: a
    torchrun job's share is `sdpo-fast plan --world-size N`)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if resolve_device(config.device).type != "cuda":
        return
    if config.check_memory and launched_world() is None:
        from .plan import check_fits

        check_fits(dataclasses.replace(config, model=config.model or str(tiny_model_path())),
                   torch.cuda.mem_get_info()[0])


def train(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None, log=_say) -> dict:
    """Check `config`, the output directory, backends, model directory and tokenizer; load and encode the data;
    then load the model (from the newest valid checkpoint when resuming) and fit.

    Everything is checked, and the data encoded, before the weights load and before anything is written to the
    output directory. `log` receives the one-line notes (data counts, warnings); default stderr.
    """
    config.validate()
    world = launched_world()
    if world is not None:
        check_distributed(config)
        world = init_world(resolve_device(config.device), config.dist_timeout_minutes)
        log = log if world.main else (lambda message: None)
    try:
        return _train(config, world, progress, stop_after, log)
    finally:
        if world is not None:
            close_world()


def _train(config: TrainConfig, world: World | None, progress: bool, stop_after: int | None, log) -> dict:
    if config.output_dir is None:
        config.output_dir = default_output_dir() if world is None else broadcast_object(default_output_dir())
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.resume)
    changes, ckpt = {}, None
    if config.resume:
        changes = resume_changes(config, output_dir)
        ckpt = latest_valid_checkpoint(output_dir, warn=lambda m: log(f"warning: {m}")) \
            if world is None or world.main else None
        if world is not None:
            ckpt = broadcast_object(ckpt)
        if ckpt is not None:
            check_resumable(ckpt, world)
        if ckpt is None:
            log(f"resume: no checkpoint in {str(output_dir)!r} yet; starting from step 0")
        elif latest_checkpoint(output_dir) != ckpt:
            log(f"warning: resuming from {str(ckpt)!r}, the newest checkpoint that is intact")
    if config.optimizer == "adamw8bit" and not importable("bitsandbytes"):
        raise ValueError(NO_BNB)
    check_backends(config)
    check_reporters(config.report_to)
    name = config.model or str(tiny_model_path())
    check_model_source(name)
    check_model_name(name, **model_check_options(config))
    check_model_options(config, name)
    tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    check_tokenizer(tokenizer, name)
    encoded, counts = load_encoded_data(config, tokenizer)
    check_behavior_logprobs(config, encoded)
    check_memory(config)
    if world is None:
        model, tokenizer = load_model_and_tokenizer(config, ckpt)
    else:  # every rank loads on the CPU, FSDP2 keeps its shard on its device; trained weights stay fp32 (masters)
        barrier()
        model, tokenizer = load_model_and_tokenizer(dataclasses.replace(config, lora_dtype="float32"), ckpt,
                                                    device=torch.device("cpu"),
                                                    dtype=None if config.lora_r else torch.float32)
    trainer = Trainer(config, model, tokenizer, encoded, resume_from=ckpt, data_counts=counts, changes=changes,
                      log=log, world=world)
    return trainer.fit(progress=progress, stop_after=stop_after)


def check_resumable(checkpoint: Path, world: World | None) -> None:
    """ValueError when `checkpoint` was written by a job of the other kind (one process vs torchrun): a sharded
    checkpoint resumes under torchrun with any number of processes, a one-process one in one process."""
    if is_sharded(checkpoint) and world is None:
        raise ValueError(f"resume: {str(checkpoint)!r} holds a sharded (torchrun) training state; resume it under "
                         "torchrun (any --nproc-per-node >= 2), or start a new run from its weights with "
                         f"--model {str(checkpoint)}")
    if not is_sharded(checkpoint) and world is not None:
        raise ValueError(f"resume: {str(checkpoint)!r} was written by one process; resume it without torchrun, "
                         f"or start a new torchrun run from its weights with --model {str(checkpoint)}")
