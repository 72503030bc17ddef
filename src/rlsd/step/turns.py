"""Multi-turn rollouts with a teacher: which completion tokens the model wrote.

TRL 1.16 marks the tokens an environment wrote into a completion (tool results, observations) with `tool_mask` = 0:
its tool loop fills it for `tools=` and `environment_factory`, and a rollout function returns it as `env_mask`. The
teacher scores [teacher prompt ; completion] with those tokens in place (it reads the same conversation), while the
credit, the distillation losses and TRL's loss read only the model's tokens (`rlsd.step.batch.loss_mask`). A rollout
function that returns no `env_mask`, or one that does not match its completions, would have the teacher's credit
land on environment tokens: it is refused here, naming the row."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

RolloutFunc = Callable[[list[Any], Any], dict[str, Any]]
"""TRL's `rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}`."""


def check_env_mask(output: dict[str, Any], what: str) -> None:
    """Refuse a rollout function's output without a usable `env_mask`: missing, not one list per completion, a row
    whose mask is not as long as its completion, or a value other than 0 / 1 (naming the row, the position and the
    turn, counted as the model segments before it). `what`: what in the config uses the teacher."""
    completions = output["completion_ids"]
    if "env_mask" not in output:
        raise ValueError(
            f"rollout_func returned no 'env_mask' with {what}: the teacher's credit must know which completion "
            "tokens the model wrote; return env_mask with each completion (1 for the model's tokens, 0 for what the "
            "environment wrote; all 1 for a single-turn rollout)"
        )
    masks = output["env_mask"]
    if len(masks) != len(completions):
        raise ValueError(f"rollout_func returned {len(masks)} env_mask rows for {len(completions)} completions")
    for row, (mask, ids) in enumerate(zip(masks, completions, strict=True)):
        values = list(mask)
        if len(values) != len(ids):
            raise ValueError(
                f"rollout_func's env_mask of row {row} has {len(values)} values for a completion of {len(ids)} tokens"
            )
        for position, value in enumerate(values):
            if value not in (0, 1):
                turn = turn_index(values, position)
                raise ValueError(
                    f"rollout_func's env_mask of row {row} holds {value!r} at token {position} (turn {turn}): "
                    "use 1 for the model's tokens and 0 for the environment's"
                )


def turn_index(mask: list[Any], position: int) -> int:
    """The model turn of completion token `position`: how many model segments resumed after an environment segment
    before it (0 in the first turn), as `rlsd.step.assign.step_ids` counts steps."""
    return sum(1 for i in range(1, position + 1) if mask[i] != 0 and mask[i - 1] == 0)


def checked_rollout_func(rollout_func: RolloutFunc | None, teacher: bool, what: str) -> RolloutFunc | None:
    """With a `teacher`, `rollout_func` with its output checked by `check_env_mask` before TRL reads it (`what`: what
    in the config uses the teacher, for the error); without one (or without a rollout function), unchanged."""
    if rollout_func is None or not teacher:
        return rollout_func

    @functools.wraps(rollout_func)
    def checked(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        output = rollout_func(prompts, trainer)
        check_env_mask(output, what)
        return output

    return checked
