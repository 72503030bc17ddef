"""Sparse-to-Dense stage schedules (specification section 4, "sparse-to-dense"; issue 14): pure functions.

A run is split by optimizer step into stages, each overriding a few fields of `RLSDConfig` (`STAGE_FIELDS`), for
example a forward-KL warm-up, then OPD, then GRPO:

    stages = [
        {"until_step": 20, "credit": "grpo", "distill_loss": "jsd", "distill_jsd_beta": 0.0, "policy_loss_coef": 0.0},
        {"until_step": 60, "credit": "opsd", "distill_loss": "none"},
        {"credit": "grpo"},
    ]

Stage i is active at optimizer step k (k = completed steps + 1, as for lam_k) when u_{i-1} < k <= u_i, with
u_{-1} = 0 and u_i = `until_step` (absent on the last stage only: it then runs to the end). After the last stage's
`until_step`, the config's own values apply (index len(stages)). A stage's fields replace the config's values; the
fields it does not name keep the config's values (not the previous stage's). A stage that sets `distill_loss` but
not `distill_coef` gets that loss's default coefficient (0.001 for `"sdpg"`, 1.0 otherwise).

A departure from the specification: its Sparse-to-Dense first trains the teacher with GRPO, then distils from it;
these stages are the student's only (nothing trains a teacher), so the specification's recipe is two runs, GRPO on the
teacher model, then a schedule with that checkpoint as `teacher_model`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from rlsd.core.distill import LOSS_KNOBS
from rlsd.infra.validate import ConfigError

_OWN_FIELDS = ("credit", "distill_loss", "distill_coef", "distill_positive_only", "policy_loss_coef")


class _StageFields(Sequence[str]):
    """The fields above and every registered distillation knob (`rlsd.core.distill.LOSS_KNOBS`), read at each use, so
    that the knob of a loss registered after this import (in user code) is a stage field too."""

    def _names(self) -> tuple[str, ...]:
        return (*_OWN_FIELDS, *LOSS_KNOBS)

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


STAGE_FIELDS: Sequence[str] = _StageFields()
"""The `RLSDConfig` fields a stage may override (besides its `until_step`)."""
UNTIL = "until_step"


def parse_stages(value: Any) -> list[dict[str, Any]] | None:
    """`RLSDConfig.stages` as a list of dicts: a JSON string (the command line) is decoded; None and [] give None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            example = '[{"until_step": 10, "credit": "opsd"}, {"credit": "grpo"}]'
            raise ConfigError("--stages", f"is not valid JSON ({err})", f"pass a JSON list such as {example}") from err
    if not isinstance(value, list | tuple) or not all(isinstance(stage, dict) for stage in value):
        raise ConfigError("--stages", f"must be a list of dicts, got {type(value).__name__}",
                          'e.g. [{"until_step": 10, "credit": "opsd"}, {"credit": "grpo"}]')  # fmt: skip
    return [dict(stage) for stage in value] or None


def check_stages(
    stages: list[dict[str, Any]],
    *,
    rules: dict[str, Any],
    losses: tuple[str, ...],
    coef_defaults: dict[str, float],
    check_rule: Callable[[str], None],
) -> None:
    """Refuse a bad stage list, naming the stage index and the field: unknown fields, a missing or non-increasing
    `until_step` (only the last stage may omit it), an unknown rule or loss, a value out of range. Fills each stage's
    `distill_coef` when it sets `distill_loss` alone (`coef_defaults`). `check_rule(credit)` raises for a rule the
    config's other options do not allow; a distillation knob's value is checked by its declaration (`Knob.check`)."""
    previous = 0
    for index, stage in enumerate(stages):
        where = f"--stages[{index}]"
        unknown = sorted(set(stage) - {UNTIL, *STAGE_FIELDS})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", "is not a field a stage may set",
                              f"a stage sets {UNTIL} and any of {', '.join(STAGE_FIELDS)}")  # fmt: skip
        until = stage.get(UNTIL)
        last = index == len(stages) - 1
        if until is None and not last:
            raise ConfigError(f"{where}.{UNTIL}", "is missing", "only the last stage may run to the end of training")
        if until is not None:
            if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
                raise ConfigError(f"{where}.{UNTIL}", f"is {until!r}, not an integer above {previous}",
                                  "until_step must increase from stage to stage, starting at 1 or more")  # fmt: skip
            previous = until
        if "credit" in stage and stage["credit"] not in rules:
            raise ConfigError(f"{where}.credit", f"is {stage['credit']!r}, not a known credit rule",
                              f"use one of {', '.join(rules)}")  # fmt: skip
        if "credit" in stage:
            try:
                check_rule(stage["credit"])
            except ValueError as err:
                fix = "change the stage's rule or the config's option"
                raise ConfigError(f"{where}.credit", str(err), fix) from err
        if "distill_loss" in stage:
            if stage["distill_loss"] not in losses:
                raise ConfigError(f"{where}.distill_loss", f"is {stage['distill_loss']!r}, not a known loss",
                                  f"use one of {', '.join(losses)}")  # fmt: skip
            stage.setdefault("distill_coef", coef_defaults.get(stage["distill_loss"], 1.0))
        _check_values(stage, where)


def _check_values(stage: dict[str, Any], where: str) -> None:
    """Types and ranges of a stage's numeric and boolean fields; the distillation knobs by their declarations."""
    for name in ("distill_coef", "policy_loss_coef"):
        if name in stage:
            value = stage[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}.{name}", f"is {value!r}", "must be a finite number >= 0")
    if "distill_positive_only" in stage and not isinstance(stage["distill_positive_only"], bool):
        raise ConfigError(f"{where}.distill_positive_only", f"is {stage['distill_positive_only']!r}",
                          "must be true or false")  # fmt: skip
    for name, knob in LOSS_KNOBS.items():
        problem = knob.check(stage[name]) if name in stage and knob.check else None
        if problem:
            raise ConfigError(f"{where}.{name}", problem)


def stage_index(stages: list[dict[str, Any]], step: int) -> int:
    """The stage active at optimizer step `step` (1-based): the first whose `until_step` is >= step (a last stage
    without one always is), else len(stages), the config's own values."""
    for index, stage in enumerate(stages):
        until = stage.get(UNTIL)
        if until is None or step <= until:
            return index
    return len(stages)


def stage_values(stages: list[dict[str, Any]], index: int, base: dict[str, Any]) -> dict[str, Any]:
    """The `STAGE_FIELDS` values of stage `index`: the config's values (`base`) overridden by the stage's own."""
    values = dict(base)
    if index < len(stages):
        values.update({key: value for key, value in stages[index].items() if key != UNTIL})
    return values


def reachable(stages: list[dict[str, Any]]) -> list[int]:
    """The stage indices a run can reach: every stage, and the config's own values (len(stages)) unless the last
    stage runs to the end."""
    indices = list(range(len(stages)))
    return [*indices, len(stages)] if stages[-1].get(UNTIL) is not None else indices
