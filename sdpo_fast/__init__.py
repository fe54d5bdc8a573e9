"""sdpo_fast: Self-Distillation Policy Optimization from users' follow-up messages, fast and memory-lean."""
from .loss import SDPOLoss, SDPOStats, sdpo_loss
from .reference import reference_sdpo_loss

__all__ = ["sdpo_loss", "SDPOLoss", "SDPOStats", "reference_sdpo_loss"]
__version__ = "0.1.0"
