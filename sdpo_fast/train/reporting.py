"""Optional metric sinks beside metrics.jsonl: TensorBoard and Weights & Biases."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_reporters(report_to: list[str]) -> None:
    """Raise before training starts when a requested sink's package is missing."""
    for name in report_to:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"report_to {name!r} needs the {_PACKAGES[name]} package (pip install {_PACKAGES[name]})")


class Reporters:
    """Sends each step's numeric metrics to the sinks in `report_to`; `close()` flushes them."""

    def __init__(self, report_to: list[str], output_dir: Path, config: dict):
        """report_to: checked by `check_reporters` before (train's preflight, or the Trainer's start)."""
        self._sinks = []
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            self._sinks.append((lambda metrics, step: [writer.add_scalar(f"train/{k}", v, step)
                                                       for k, v in metrics.items()], writer.close))
        if "wandb" in report_to:
            import wandb

            run = wandb.init(project="sdpo_fast", dir=str(output_dir), config=config, resume="allow")
            self._sinks.append((lambda metrics, step: run.log({f"train/{k}": v for k, v in metrics.items()},
                                                              step=step), run.finish))

    def log(self, metrics: dict, step: int) -> None:
        numeric = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for log, _ in self._sinks:
            log(numeric, step)

    def close(self) -> None:
        for _, close in self._sinks:
            close()
