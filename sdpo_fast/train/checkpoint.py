"""Atomic checkpoints: Hugging Face weights (adapters only for LoRA) + tokenizer + optimizer/scheduler/RNG/step."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..utils.files import replace_dir

STATE_FILE = "trainer_state.pt"
TEACHER_FILE = "teacher.safetensors"
STALE_PATTERNS = (".checkpoint-*.tmp*", ".checkpoint-*.old*")
"""What an interrupted `save_checkpoint` can leave in output_dir (removed when a run starts)."""
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in output_dir, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, tokenizer, optimizer, scheduler,
                    extra: dict, teacher_state: dict | None = None) -> Path:
    """Write output_dir/checkpoint-{step} atomically (built aside, then swapped in); returns its path.

    `extra` holds plain values (ints, floats, strings) describing the run position, stored with the state;
    teacher_state (name -> tensor, the ema/base teacher's own weights) goes to teacher.safetensors when non-empty.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "extra": dict(extra),
        }
        torch.save(state, tmp / STATE_FILE)
        if teacher_state:
            from safetensors.torch import save_file

            save_file({name: t.contiguous() for name, t in teacher_state.items()}, str(tmp / TEACHER_FILE))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))

    return replace_dir(Path(output_dir) / f"checkpoint-{step}", write)


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


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
