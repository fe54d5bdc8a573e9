"""Training: the one `train_step`, the run builder and setup factories, the offline trainer with its preflight
checks and run-directory policy, config, checkpoints, memory plan and a pure-PyTorch reference step."""
from .build import load_encoded_data, objective_of, step_options
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import PRESETS, TrainConfig, load_yaml, resolve_config
from .plan import SimulatedPlan, simulate
from .reference_step import reference_loss, reference_step
from .setup import (apply_lora, build_optimizer, build_scheduler, load_model, load_model_and_tokenizer,
                    load_tokenizer, lora_config, resolve_device, resolve_dtype)
from .step import StepOptions, StepStats, interaction_weights, loss_token_counts, train_step
from .trainer import Trainer, train

__all__ = [
    "PRESETS",
    "StepOptions",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "apply_lora",
    "build_optimizer",
    "build_scheduler",
    "interaction_weights",
    "latest_checkpoint",
    "load_encoded_data",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "load_trainer_state",
    "load_yaml",
    "loss_token_counts",
    "lora_config",
    "objective_of",
    "reference_loss",
    "reference_step",
    "resolve_config",
    "resolve_device",
    "resolve_dtype",
    "SimulatedPlan",
    "save_checkpoint",
    "simulate",
    "step_options",
    "train",
    "train_step",
]
