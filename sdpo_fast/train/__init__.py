"""Offline SDPO / SFT training: config, the exact-accumulation step, checkpoints and a reference step."""
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import PRESETS, TrainConfig, load_yaml, resolve_config
from .plan import MemoryPlan, plan_memory
from .reference_step import reference_loss, reference_step
from .trainer import (
    StepStats,
    Trainer,
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    interaction_weights,
    load_encoded_data,
    load_model_and_tokenizer,
    optimizer_step,
    sft_loss,
    train,
)

__all__ = [
    "MemoryPlan",
    "PRESETS",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "accumulate_gradients",
    "build_optimizer",
    "build_scheduler",
    "interaction_weights",
    "latest_checkpoint",
    "load_encoded_data",
    "load_model_and_tokenizer",
    "load_trainer_state",
    "load_yaml",
    "optimizer_step",
    "plan_memory",
    "reference_loss",
    "reference_step",
    "resolve_config",
    "save_checkpoint",
    "sft_loss",
    "train",
]
