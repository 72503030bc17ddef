"""RLSD's metrics, reduced over processes and appended to TRL's metric lists under `rlsd/`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator


def reduce_metrics(accelerator: Accelerator, sink: Mapping[str, Any], mode: str, metrics: dict[str, float]) -> None:
    """Combine each metric over processes and append it to `sink[mode]["rlsd/<key>"]` (TRL's `_metrics`): a
    `TokenMean` by the count-weighted mean (token-weighted, as TRL's global masked mean), `*_count` metrics by their
    sum, any other value by the mean over processes (NaN-aware). A collective: every process passes the same keys."""
    if not metrics:  # the same keys on every process: none to gather anywhere
        return
    keys = sorted(metrics)
    values = [metrics[k] for k in keys]
    counts = [getattr(v, "count", math.nan) for v in values]
    local = torch.tensor([values + counts], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local).view(-1, 2 * len(keys))
    for index, key in enumerate(keys):
        column, count = gathered[:, index], gathered[:, len(keys) + index]
        if key.endswith("_count"):
            value = column.nansum()
        elif torch.isnan(count).all():
            value = column.nanmean()
        else:
            counted = count > 0
            value = (column[counted] * count[counted]).sum() / count[counted].sum()
        if not math.isnan(value.item()):
            sink[mode][f"rlsd/{key}"].append(value.item())
