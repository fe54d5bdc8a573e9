"""Atomic checkpoints: Hugging Face weights (adapters only for LoRA) + tokenizer + optimizer/scheduler/RNG/step,
with a manifest of every file's size and SHA-256 (checked on resume), and rotation."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..utils.files import replace_dir
from .distributed import SHARDED_DIR, World, barrier, broadcast_object, full_state_dict, load_sharded, save_sharded

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
TEACHER_FILE = "teacher.safetensors"
RNG_FILE = "rng-rank{rank}.pt"
STALE_PATTERNS = (".checkpoint-*.tmp*", ".checkpoint-*.old*")
"""What an interrupted `save_checkpoint` can leave in output_dir (removed when a run starts)."""
_NAME = re.compile(r"^checkpoint-(\d+)$")
_HASH_CHUNK = 8 << 20


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories in output_dir that have a trainer state, oldest step first (not yet verified)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` cannot be trusted (a missing, truncated or altered file, no manifest), or None if every
    file matches the sizes and hashes recorded when it was saved."""
    checkpoint = Path(checkpoint)
    try:
        recorded = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST_FILE} (incomplete save)"
    for name, entry in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were saved"
    for name, entry in recorded.items():
        if _sha256(checkpoint / name) != entry["sha256"]:
            return f"{name} does not match the hash recorded at save"
    return None


def latest_valid_checkpoint(output_dir: str | os.PathLike,
                            warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint whose files match its manifest; each newer one that does not is reported to `warn`."""
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if warn is not None:
            warn(f"checkpoint {str(checkpoint)!r} is not usable ({problem}); trying the previous one")
    return None


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, tokenizer, optimizer, scheduler,
                    extra: dict, teacher_state: dict | None = None, world: World | None = None,
                    weights_dtype: torch.dtype | None = None) -> Path:
    """Write output_dir/checkpoint-{step} atomically (built aside, then swapped in); returns its path.

    `extra` holds plain values (ints, floats, strings) describing the run position, stored with the state;
    teacher_state (name -> tensor, the ema/base teacher's own weights) goes to teacher.safetensors when non-empty.
    The manifest (sizes and SHA-256 of every file) is written last.

    Under torchrun (`world`, every rank calls this): the trainable weights and optimizer state go sharded to
    distributed/ (torch.distributed.checkpoint, every rank writing its shards), each rank's RNG to
    rng-rank{r}.pt, and rank 0 writes the rest, with the weights gathered into one Hugging Face directory
    (cast to `weights_dtype`) exactly as one process writes it.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    if world is not None and not world.main:
        _write_rank_part(Path(broadcast_object(None)), model, optimizer, world)
        barrier()  # rank 0 writes the manifest once every shard is on disk
        barrier()  # rank 0 has swapped the checkpoint in
        return final

    def write(tmp: Path) -> None:
        if world is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            broadcast_object(str(tmp))
            weights = _write_rank_part(tmp, model, optimizer, world, weights_dtype)
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if world is None else None,
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world_size": 1 if world is None else world.size,
            "extra": dict(extra),
        }
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
        if teacher_state:
            from safetensors.torch import save_file

            save_file({name: t.contiguous() for name, t in teacher_state.items()}, str(tmp / TEACHER_FILE))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        if world is not None:
            barrier()
        (tmp / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": _manifest(tmp)}, indent=1))

    path = replace_dir(final, write)
    if world is not None:
        barrier()
    return path


def _write_rank_part(tmp: Path, model, optimizer, world: World, weights_dtype: torch.dtype | None = None) -> dict:
    """This rank's share of a sharded checkpoint in `tmp`; returns the gathered weights (rank 0) or {}."""
    save_sharded(tmp / SHARDED_DIR, model, optimizer)
    torch.save({"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / RNG_FILE.format(rank=world.rank))
    return full_state_dict(model, weights_dtype, trainable_only=_is_peft(model))


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int, newest: Path) -> list[Path]:
    """Delete the oldest checkpoints so that at most `keep` (>= 1) remain; `newest` (the one just saved, complete)
    is never deleted. Returns the deleted paths."""
    others = [p for p in checkpoint_dirs(output_dir) if p.resolve() != Path(newest).resolve()]
    doomed = others[:max(0, len(others) - (keep - 1))]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    """The optimizer/scheduler/RNG/step state saved by `save_checkpoint` (tensors and plain values only)."""
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True, map_location="cpu")


def load_teacher_state(checkpoint: str | os.PathLike) -> dict:
    """The teacher tensors saved by `save_checkpoint` ({} when it saved none)."""
    path = Path(checkpoint) / TEACHER_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def load_sharded_state(checkpoint: str | os.PathLike, model, optimizer, world: World | None) -> None:
    """The sharded weights and optimizer state of a checkpoint written under torchrun, and this rank's RNG
    (a rank the saving job did not have keeps its seeded RNG)."""
    checkpoint = Path(checkpoint)
    load_sharded(checkpoint / SHARDED_DIR, model, optimizer)
    rng = checkpoint / RNG_FILE.format(rank=0 if world is None else world.rank)
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=True, map_location="cpu"))


def is_sharded(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / SHARDED_DIR).is_dir()


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
