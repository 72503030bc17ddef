"""rlsd: RLSD (RLVR with Self-Distillation) and its self-distillation family on TRL.

`RLSDConfig` and `RLSDTrainer` are imported on first use, so that the command line's help and version (and any
light use of the package) do not pay for importing torch, transformers and TRL."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsd.config import RLSDConfig
    from rlsd.trainer import RLSDTrainer

__all__ = ["RLSDConfig", "RLSDTrainer"]
__version__ = "0.3.0.dev0"
_LAZY = {"RLSDConfig": "rlsd.config", "RLSDTrainer": "rlsd.trainer"}


def __getattr__(name: str) -> Any:
    """The public classes, imported from their modules on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlsd' has no attribute {name!r}")
