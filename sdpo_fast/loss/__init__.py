"""The loss layer: `sdpo_loss` from hidden states (autograd function over torch/Triton backends), its plain
reference, and the training objectives built on it."""
from .api import SDPOLoss, SDPOStats, sdpo_loss
from .backends import BACKENDS, LossBackend, default_workspace_bytes, get_backend, resolve_backend
from .function import LossParams, SDPOFunction
from .objectives import (FullLogitObjective, LossInputs, Objective, ObjectiveOutput, SDPOObjective, SFTObjective,
                         TopKLogitObjective, distillation_objective, make_objective)
from .reference import reference_sdpo_loss, reference_token_logprobs
from .sft import sft_loss

__all__ = ["BACKENDS", "FullLogitObjective", "LossBackend", "LossInputs", "LossParams", "Objective",
           "ObjectiveOutput", "SDPOFunction", "SDPOLoss", "SDPOObjective", "SDPOStats", "SFTObjective",
           "TopKLogitObjective", "default_workspace_bytes", "distillation_objective", "get_backend", "make_objective",
           "reference_sdpo_loss", "reference_token_logprobs", "resolve_backend", "sdpo_loss", "sft_loss"]
