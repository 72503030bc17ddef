"""rlsd: RLSD (RLVR with Self-Distillation) and its self-distillation family on TRL."""

from rlsd.config import RLSDConfig
from rlsd.trainer import RLSDTrainer

__all__ = ["RLSDConfig", "RLSDTrainer"]
__version__ = "0.3.0.dev0"
