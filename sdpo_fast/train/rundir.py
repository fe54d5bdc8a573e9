"""The run directory and resume policy, decided once per run: where the run writes (a fresh directory, or with
--resume its own run directory), which checkpoint it continues from (the newest whose files match their recorded
sizes and hashes, warning about newer broken ones; none yet: step 0), which changed options a resume may apply
(`CHANGEABLE_ON_RESUME`; the others are refused), and the files a run's start writes (config.yaml, a metrics.jsonl
"start" event, config_history.jsonl)."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..utils.files import disk_error, write_text_atomic
from .checkpoint import (STALE_PATTERNS, checkpoint_dirs, checkpoint_problem, is_sharded, latest_checkpoint,
                         latest_valid_checkpoint)
from .config import TrainConfig, load_yaml, save_config
from .distributed import World, broadcast_object

CHANGEABLE_ON_RESUME = ("lr", "epochs", "max_steps", "weight_decay", "max_grad_norm", "micro_batch_tokens",
                        "save_steps", "save_minutes", "save_total_limit", "logging_steps", "report_to",
                        "gradient_checkpointing", "checkpoint_layers", "offload_activations", "prefix_reuse",
                        "attn_backend", "loss_backend", "device", "use_liger", "dist_timeout_minutes")
"""Options `--resume` may change: applied from the resumed step on (lr and weight_decay replace the saved
optimizer's; epochs/max_steps re-shape the schedule to the new total) and recorded."""
NOT_COMPARED_ON_RESUME = ("output_dir", "resume", "preset")
"""Every other option (model, data, data filters and token limits, seed, shuffle, batch_size, loss, aggregation,
ignore_first_k, temperature, signal_clip, importance_clip, optimizer, schedule, warmup_ratio, LoRA settings, dtype,
load_in_4bit, trust_remote_code, and any option added later) is fixed: a resume that changes one is refused."""


@dataclass(frozen=True)
class RunDirectory:
    """Where a run writes, the checkpoint it continues from (None: step 0) and the options its resume changes
    ({option: [saved, new]})."""

    path: Path
    checkpoint: Path | None = None
    changes: dict = field(default_factory=dict)


def open_run_directory(config: TrainConfig, world: World | None, log) -> RunDirectory:
    """The run directory of `config` (default runs/sdpo-<timestamp>, written into config.output_dir), checked
    (`check_output_dir`), with the resume decided: changed options checked, the checkpoint resolved."""
    if config.output_dir is None:
        config.output_dir = default_output_dir() if world is None else broadcast_object(default_output_dir())
    path = Path(config.output_dir)
    check_output_dir(path, config.resume)
    if not config.resume:
        return RunDirectory(path)
    changes = resume_changes(config, path)
    checkpoint = resolve_checkpoint(path, world, log)
    if checkpoint is None:
        log(f"resume: no checkpoint in {str(path)!r} yet; starting from step 0")
    elif latest_checkpoint(path) != checkpoint:
        log(f"warning: resuming from {str(checkpoint)!r}, the newest checkpoint that is intact")
    return RunDirectory(path, checkpoint, changes)


def resolve_checkpoint(output_dir: Path, world: World | None, log) -> Path | None:
    """The newest intact checkpoint of `output_dir` (found by rank 0, shared with the others), checked to be of
    this job's kind (`check_resumable`); None when there is none."""
    main = world is None or world.main
    found = latest_valid_checkpoint(output_dir, warn=lambda m: log(f"warning: {m}")) if main else None
    if world is not None:
        found = broadcast_object(found)
    if found is not None:
        check_resumable(found, world)
    return found


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


def default_output_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("sdpo-%Y%m%d-%H%M%S"))


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
    else:
        check_fresh(path)


def check_fresh(path: Path) -> None:
    """ValueError unless `path` is missing or empty (stale temporary files aside): a new run's directory."""
    if path.is_dir() and any(_entries(path)):
        raise ValueError(f"output_dir {str(path)!r} is not empty; pass --resume to continue its run "
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


def write_run_files(output_dir: Path, config: TrainConfig, step: int, resumed_from: Path | None, changes: dict,
                    data_counts: dict | None, log, fit: dict | None = None) -> None:
    """A run's start at `step`: with --resume, newer broken checkpoints set aside; stale temporary files removed;
    config.yaml; metrics.jsonl cut back to `step` plus a "start" event (with what --fit chose, `fit`); a
    config_history.jsonl record."""
    if config.resume:
        set_aside_newer_checkpoints(output_dir, step, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    for pattern in STALE_PATTERNS:
        for stale in output_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    save_config(config, output_dir / "config.yaml")
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    event = {"event": "start", "step": step, "resumed_from": str(resumed_from) if resumed_from is not None else None,
             "changed": changes, "data": data_counts, "fit": fit}
    kept = [line for line in lines if _logged_step(line) <= step]
    write_text_atomic(metrics, "".join(line + "\n" for line in kept) + json.dumps(event) + "\n")
    history = output_dir / "config_history.jsonl"
    previous = history.read_text() if history.exists() else ""
    record = {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "resumed_from": event["resumed_from"], "changed": changes}
    write_text_atomic(history, previous + json.dumps(record) + "\n")


def set_aside_newer_checkpoints(output_dir: Path, step: int, log) -> None:
    """Checkpoints after `step` (or all, resuming from step 0) failed verification; renamed NAME.corrupt so that
    neither resume nor rotation takes them."""
    for path in checkpoint_dirs(output_dir):
        if int(path.name.split("-")[1]) > step and checkpoint_problem(path) is not None:
            target = path.with_name(path.name + ".corrupt")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            log(f"warning: set {str(path)!r} aside as {target.name}")


def _logged_step(line: str) -> float:
    """The step of a metrics line; inf for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
