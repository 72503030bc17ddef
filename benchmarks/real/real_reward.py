"""The lenient reward of the SmolLM2-135M run: 1.0 when the last integer of the completion is the reference.

SmolLM2-135M-Instruct (Q4_1, sampled at T = 1) almost never writes `\\boxed{}` or `#### N` (0 of 72 probe samples
were parseable by `math_accuracy` / `integer_match`), so the run scores the last integer it writes. Used from this
folder as `--reward_funcs real_reward.last_integer` (rlsd imports a module from the current folder by its file).
"""

from __future__ import annotations

import re
from typing import Any

from rlsd.data.rewards import completion_text

_INTEGER = re.compile(r"-?\d+")


def last_integer(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    rewards = []
    for completion, reference in zip(completions, solution, strict=True):
        found = _INTEGER.findall(completion_text(completion).replace(",", ""))
        rewards.append(1.0 if found and found[-1].lstrip("+") == str(reference).strip() else 0.0)
    return rewards
