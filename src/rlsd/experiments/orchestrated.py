"""The bench's methods that are not one `RLSDTrainer` run but their own orchestration of several policies, and the
one call `rlsd bench methods` makes per (method, seed) whichever kind of method it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlsd.experiments.coars_task import train_coars
from rlsd.experiments.copd_task import train_copd
from rlsd.experiments.demo import DemoConfig, train_method

Record = Callable[[dict[str, Any]], None]
ORCHESTRATED: dict[str, Callable[..., dict[str, Any]]] = {"coars": train_coars, "copd": train_copd}
"""Method name -> `train(method, config, record, progress)` returning the run's summary (`demo.run_summary`)."""


def train_bench_method(
    method: str,
    config: DemoConfig,
    warm_path: Path,
    eval_problems: list,
    record: Record,
    progress: bool,
    peers: dict[str, Callable[[DemoConfig], Any]],
) -> dict[str, Any]:
    """Train one (method, seed) of the bench: an orchestrated method by its own loop, a peer library's trainer by
    its builder (`peers`), any other method by `RLSDTrainer` from the warm start; returns the run's summary."""
    if method in ORCHESTRATED:
        return ORCHESTRATED[method](method, config, record, progress)
    builder = peers[method](config) if method in peers else None
    _, summary = train_method(
        method, config, warm_path, eval_problems, record, progress=progress, build_trainer=builder
    )
    return summary
