"""Verifiable rewards with TRL's signature `f(completions, solution, **kwargs) -> list[float]`.

Each is usable by name on the command line (`--reward_funcs math_accuracy format`) or by dotted import path.
`guard_reward` wraps any reward so that an exception stops the run naming the function, the row and the error.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

RewardFunc = Callable[..., list[float | None]]

MAX_PARSE_CHARS = 4000
"""math-verify only reads the last MAX_PARSE_CHARS characters of a completion: the answer is at the end, and a
bounded input keeps a pathological completion from dominating the step."""
PARSE_TIMEOUT_S = 2
"""Bound on each of math-verify's parse and compare calls (signal-based: the main thread, as in training)."""

_BOXED = "\\boxed{"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*(?:.*\\boxed\{.*\}|<answer>.*?</answer>)\s*$", re.DOTALL)
_INTEGER_RE = re.compile(r"[-+]?\d[\d,]{0,40}")


def completion_text(completion: Any) -> str:
    """The text of a plain-text or conversational completion."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if isinstance(message.get("content"), str))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None when there is none or it is not closed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, index = 1, start + len(_BOXED)
    for position in range(index, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[index:position]
    return None


def math_accuracy(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1.0 when math-verify finds the completion's final answer equal to the reference, else 0.0.

    A completion with no parseable answer scores 0 and is counted in the `rewards/math_unparseable` metric
    (through TRL's `log_metric`); math-verify's own errors and time-outs count as unparseable, never raise.
    """
    from math_verify import LatexExtractionConfig, parse, verify

    log_metric = kwargs.get("log_metric")
    rewards, unparseable = [], 0
    for completion, reference in zip(completions, solution, strict=True):
        text = completion_text(completion)[-MAX_PARSE_CHARS:]
        gold = parse(_as_latex(reference), parsing_timeout=PARSE_TIMEOUT_S)
        predicted = parse(text, extraction_config=[LatexExtractionConfig()], parsing_timeout=PARSE_TIMEOUT_S)
        if not predicted:
            tag = _ANSWER_TAG_RE.findall(text)
            predicted = parse(_as_latex(tag[-1]), parsing_timeout=PARSE_TIMEOUT_S) if tag else []
        if not predicted or not gold:
            unparseable += 1
            rewards.append(0.0)
            continue
        rewards.append(1.0 if verify(gold, predicted, timeout_seconds=PARSE_TIMEOUT_S) else 0.0)
    if log_metric is not None:
        log_metric("rewards/math_unparseable", unparseable / max(1, len(rewards)))
    return rewards


def _as_latex(answer: Any) -> str:
    """A reference answer wrapped for math-verify's LaTeX extractor."""
    text = str(answer).strip()
    return text if text.startswith("$") or _BOXED in text else f"${text}$"


def integer_match(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the final answer (last `\\boxed{}`, else `<answer>`, else `####`) is the reference integer."""
    rewards = []
    for completion, reference in zip(completions, solution, strict=True):
        answer = extract_final_answer(completion_text(completion))
        expected = _to_int(str(reference))
        matched = answer is not None and expected is not None and _to_int(answer) == expected
        rewards.append(1.0 if matched else 0.0)
    return rewards


def extract_final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the last `<answer>` content, else what follows the last `####`."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    return None


def _to_int(text: str) -> int | None:
    """An integer written with optional sign and thousands separators; None otherwise."""
    text = text.strip().rstrip(".").replace("$", "")
    if not _INTEGER_RE.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for `<think>...</think>` followed by a `\\boxed{}` or an `<answer>...</answer>`, else 0.0."""
    return [1.0 if _FORMAT_RE.match(completion_text(c)) else 0.0 for c in completions]


REWARDS: dict[str, RewardFunc] = {
    "math_accuracy": math_accuracy,
    "integer_match": integer_match,
    "format": format_reward,
}


def task_accuracy(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """The embedded arithmetic task's verifier (see `rlsd.task.accuracy_reward`)."""
    from rlsd.task import accuracy_reward

    return accuracy_reward(completions, solution, **kwargs)


REWARDS["task_accuracy"] = task_accuracy


def resolve_reward(name: str) -> RewardFunc:
    """A registered reward by name, or any function by dotted import path (`my_pkg.rewards.fn`)."""
    if name in REWARDS:
        return guard_reward(REWARDS[name])
    if "." not in name:
        raise ValueError(f"unknown reward {name!r}; use one of {', '.join(REWARDS)} or a dotted import path")
    module_path, attribute = name.rsplit(".", 1)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_path)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import module {module_path!r} ({err})") from err
    if not hasattr(module, attribute):
        raise ValueError(f"reward {name!r}: module {module_path!r} has no attribute {attribute!r}")
    return guard_reward(getattr(module, attribute))


def guard_reward(func: RewardFunc) -> RewardFunc:
    """Wrap a reward so that an exception names the function, the first failing row and the error."""
    name = getattr(func, "__name__", repr(func))
    if getattr(func, "_rlsd_guarded", False):
        return func

    @functools.wraps(func)
    def guarded(completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            return func(completions, **kwargs)
        except Exception as err:
            row = _first_failing_row(func, completions, kwargs)
            where = f"row {row}" if row is not None else "the batch (no single row fails alone)"
            raise RuntimeError(f"reward function {name!r} raised on {where}: {type(err).__name__}: {err}") from err

    guarded._rlsd_guarded = True
    return guarded


def _first_failing_row(func: RewardFunc, completions: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Re-run the reward one row at a time to find the row that raises."""
    for index in range(len(completions)):
        row_kwargs = {
            key: [value[index]] if isinstance(value, list) and len(value) == len(completions) else value
            for key, value in kwargs.items()
        }
        try:
            func([completions[index]], **row_kwargs)
        except Exception:
            return index
    return None
