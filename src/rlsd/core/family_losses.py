"""Distillation losses of the self-distillation family beyond the project's own (`@distill_loss`, each one function
with its knobs): registered when `rlsd.core` is imported. The shared kernels and the registry are in
`rlsd.core.distill`."""

from __future__ import annotations

from rlsd.core.distill import Knob, TokenLoss, distill_loss  # noqa: F401
