"""sdpo_fast: Self-Distillation Policy Optimization from users' follow-up messages, fast and memory-lean.

Layers, each a folder, importing only downward: kernels -> loss -> model -> data -> demo -> train / online /
explain -> cli (utils and constants serve all).
"""
from .loss import SDPOLoss, SDPOStats, reference_sdpo_loss, sdpo_loss

__all__ = ["sdpo_loss", "SDPOLoss", "SDPOStats", "reference_sdpo_loss"]
__version__ = "0.1.0"
