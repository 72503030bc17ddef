"""Verifiable rewards with TRL's signature `f(completions, solution, **kwargs) -> list[float]`.

Each is usable by name on the command line (`--reward_funcs math_accuracy format`) or by dotted import path.
`guard_reward` wraps any reward so that an exception, a hang past its time bound or a malformed output (a scalar,
strings, NaN, inf) stops the run naming the function (and the row). Bounded calls of importable rewards run in a
worker process that is killed on overrun (`rlsd.data.reward_worker`): a thread cannot stop code that holds the
interpreter lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlsd.data import reward_worker
from rlsd.data.reward_files import check_working_folder_spec, inside_working_folder, reward_file
from rlsd.data.reward_range import check_reward_range
from rlsd.infra.validate import MAX_ANSWER_CHARS, RewardError

RewardFunc = Callable[..., list[float | None]]

MAX_PARSE_CHARS = 4000
"""math-verify only reads the last MAX_PARSE_CHARS characters of a completion: the answer is at the end, and a
bounded input keeps a pathological completion from dominating the step."""
PARSE_TIMEOUT_S = 2
"""Bound on each of math-verify's parse and compare calls. math-verify bounds them with signals, which only the main
thread can use; off the main thread `math_accuracy` runs in the reward worker process's main thread instead."""
DEFAULT_REWARD_TIMEOUT_S = 600.0
"""Default bound, in seconds, on one call of a reward function (`RLSDConfig.reward_timeout`; 0: none)."""

logger = logging.getLogger(__name__)

_BOXED = "\\boxed{"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_THEN_ANSWER_RE = re.compile(r"</think>\s*<answer>")
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
    (through TRL's `log_metric`); math-verify's own errors and time-outs count as unparseable, never raise. A
    reference answer longer than `MAX_ANSWER_CHARS` is not parsed (it scores 0, counted, with a warning). Works in
    any thread: math-verify bounds each parse with signals, which only the main thread can use, so off the main
    thread the call runs in the reward worker process (in its main thread; `rlsd.data.reward_worker`). Without
    those bounds a completion such as `\\boxed{9^{9^{9^{9}}}}` froze the process, the interpreter lock held.
    """
    on_main = threading.current_thread() is threading.main_thread()
    if not on_main:
        try:
            return call_in_worker(math_accuracy, None, None, completions, {"solution": solution, **kwargs})
        except (reward_worker.NotSendable, reward_worker.LoadFailed) as err:
            logger.warning("math_accuracy runs off the main thread without math-verify's bounds (%s)", err)
    from math_verify import LatexExtractionConfig, parse, verify

    log_metric = kwargs.get("log_metric")
    bound = PARSE_TIMEOUT_S if on_main else None
    rewards, unparseable = [], 0
    for row, (completion, reference) in enumerate(zip(completions, solution, strict=True)):
        text = completion_text(completion)[-MAX_PARSE_CHARS:]
        if len(str(reference)) > MAX_ANSWER_CHARS:
            logger.warning("math_accuracy: the reference answer of batch row %d is %d characters long; scored 0",
                           row, len(str(reference)))  # fmt: skip
            gold = []
        else:
            gold = parse(_as_latex(reference), parsing_timeout=bound)
        predicted = parse(text, extraction_config=[LatexExtractionConfig()], parsing_timeout=bound) if gold else []
        if gold and not predicted:
            tag = _ANSWER_TAG_RE.findall(text)
            predicted = parse(_as_latex(tag[-1]), parsing_timeout=bound) if tag else []
        if not predicted or not gold:
            unparseable += 1
            rewards.append(0.0)
            continue
        rewards.append(1.0 if verify(gold, predicted, timeout_seconds=bound) else 0.0)
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
    return [1.0 if well_formatted(completion_text(c)) else 0.0 for c in completions]


def well_formatted(text: str) -> bool:
    """`<think>...</think>`, then a `\\boxed{` closed by the final `}` or an `<answer>...</answer>` at the end: the
    language of the former regex, decided with linear scans (the regex backtracked cubically: 88 s on 60 KB)."""
    body = text.strip()
    if not body.startswith("<think>"):
        return False
    first_end = body.find("</think>", len("<think>"))
    if first_end < 0:
        return False
    # a \boxed{ after the first </think> that the final } closes: the first </think> leaves the most room
    if body.endswith("}") and body.rfind(_BOXED, first_end + len("</think>"), len(body) - 1) >= 0:
        return True
    if not body.endswith("</answer>"):
        return False
    return any(m.end() <= len(body) - len("</answer>") for m in _THINK_THEN_ANSWER_RE.finditer(body, first_end))


math_accuracy._rlsd_self_bounded = True  # on the main thread every parse and compare is bounded

REWARDS: dict[str, RewardFunc] = {
    "math_accuracy": math_accuracy,
    "integer_match": integer_match,
    "format": format_reward,
}


def resolve_reward(name: str, timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S) -> RewardFunc:
    """A registered reward by name, a function by dotted import path (`my_pkg.rewards.fn`: an installed module, or
    one in the working folder), or a function of a file (`path/to/rewards.fn`: `path/to/rewards.py`, relative to the
    working folder, or absolute), guarded. A file that resolves (through `..` or a symbolic link) outside the working
    folder is refused unless its path was given absolute; every file loaded is logged with its resolved path."""
    if name in REWARDS:
        return guard_reward(REWARDS[name], timeout_s)
    if "." not in name:
        raise ValueError(f"unknown reward {name!r}; use one of {', '.join(REWARDS)} or a dotted import path")
    module_path, attribute = name.rsplit(".", 1)
    try:
        module = import_user_module(module_path, name)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import module {module_path!r} ({err})") from err
    if not hasattr(module, attribute):
        raise ValueError(f"reward {name!r}: module {module_path!r} has no attribute {attribute!r}")
    return guard_reward(getattr(module, attribute), timeout_s)


def import_user_module(module_path: str, reward: str = "") -> Any:
    """Import a user's module: an installed one as usual; a path (`sub/rewards`, `/abs/rewards`) from its file; else
    one in the current folder, loaded by its file alone. `sys.path` is left as it is, so a file planted in the
    current folder (a `math_verify.py`) never shadows an installed package, neither now nor for later imports."""
    if "/" in module_path or "\\" in module_path or module_path.startswith((".", "~")):
        return reward_worker.load_module_file(module_path, reward_file(module_path, reward or module_path))
    top = module_path.split(".", 1)[0]
    spec = None if top in sys.modules else importlib.util.find_spec(top)
    if spec is not None:  # found on the module path: through the working folder (`python -m`), it must stay inside
        check_working_folder_spec(spec, reward or module_path)
    elif top not in sys.modules:
        folder = os.getcwd()
        package = os.path.join(folder, top, "__init__.py")
        path = package if os.path.exists(package) else os.path.join(folder, f"{top}.py")
        if os.path.exists(path):
            reward_worker.load_module_file(top, str(inside_working_folder(Path(path), reward or module_path)))
    return importlib.import_module(module_path)


def guard_reward(func: RewardFunc, timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S) -> RewardFunc:
    """Wrap a reward so that an exception names the function, the first failing row and the error; a call that
    takes longer than `timeout_s` seconds (None or 0: no bound) stops the run naming the function; and an output
    that is not one finite number (or None) per completion is refused. Guarding a guarded reward re-bounds it."""
    if getattr(func, "_rlsd_guarded", False):
        if func._rlsd_timeout_s == timeout_s:
            return func
        func = func.__wrapped__
    name = callable_name(func)
    if is_async_callable(func):
        return _guard_async_reward(func, name, timeout_s)

    @functools.wraps(func)
    def guarded(completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            output = call_bounded(func, name, timeout_s, completions, kwargs)
        except RewardTimeoutError as err:
            where = _hanging_row(func, name, err.timeout_s, completions, kwargs)
            raise RewardTimeoutError(name, err.timeout_s, err.count, where) from None
        except RewardError:
            raise
        except Exception as err:
            row = _first_failing_row(func, name, timeout_s, completions, kwargs)
            where = f"row {row}" if row is not None else "the batch (no single row fails alone)"
            raise RewardError(name, f"raised on {where}: {type(err).__name__}: {err}", _thread_hint(err)) from err
        return checked_rewards(output, name, len(completions))

    guarded.__name__ = name  # TRL's name of the reward (its metrics' keys), also for a partial or an instance
    guarded._rlsd_guarded = True
    guarded._rlsd_timeout_s = timeout_s
    return guarded


def callable_name(func: Any) -> str:
    """A reward's name as TRL's `get_callable_name` gives it: a partial's function's, else `__name__`, else the
    class name of a callable instance."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async_callable(func: Any) -> bool:
    """Whether calling `func` returns a coroutine, decided as TRL's `is_async_callable` decides it (so that a guarded
    reward is awaited exactly when TRL would await the reward itself): a function, a `functools.partial` of one, or
    an instance whose `__call__` is `async def`."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(func.__call__)


def _guard_async_reward(func: RewardFunc, name: str, timeout_s: float | None) -> RewardFunc:
    """`guard_reward` of an async reward: an `async def` that TRL awaits on its event loop as it awaits the reward
    itself (in parallel with the other async rewards), cancelled after `timeout_s` seconds (at its next `await`: a
    coroutine that blocks without awaiting cannot be stopped; write CPU-bound rewards as plain functions, which run
    in the reward worker process), its exceptions naming the first failing row and its output checked."""

    @functools.wraps(func)
    async def guarded(completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            output = await _await_bounded(func, timeout_s, completions, kwargs)
        except _Overran:
            raise RewardTimeoutError(name, timeout_s, len(completions)) from None
        except RewardError:
            raise
        except Exception as err:
            row = None
            for index in range(len(completions)):
                try:
                    await _await_bounded(func, timeout_s, [completions[index]],
                                         _row_kwargs(kwargs, index, len(completions)))  # fmt: skip
                except _Overran:
                    continue
                except Exception:
                    row = index
                    break
            where = f"row {row}" if row is not None else "the batch (no single row fails alone)"
            raise RewardError(name, f"raised on {where}: {type(err).__name__}: {err}") from err
        return checked_rewards(output, name, len(completions))

    guarded.__name__ = name
    guarded._rlsd_guarded = True
    guarded._rlsd_timeout_s = timeout_s
    return guarded


class _Overran(Exception):
    """An async reward call ran past its bound (told apart from a TimeoutError the reward raises itself)."""


async def _await_bounded(func: RewardFunc, timeout_s: float | None, completions: list[Any], kwargs: dict) -> Any:
    """`await func(completions, **kwargs)`; past `timeout_s` seconds (None or 0: no bound) the call is cancelled and
    `_Overran` raised."""
    call = func(completions, **kwargs)
    if not timeout_s:
        return await call
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        raise _Overran
    return task.result()


def call_reward(func: RewardFunc, completions: list[Any], **kwargs: Any) -> list[float | None]:
    """A reward's output, sync or async (run to completion in a new event loop): for callers outside the trainer
    (`rlsd eval`), which TRL's event loop does not serve."""
    output = func(completions, **kwargs)
    return asyncio.run(output) if inspect.iscoroutine(output) else output


def guard_rewards(reward_funcs: Any, timeout_s: float | None) -> Any:
    """A trainer's `reward_funcs` (one or a list) with every reward function, plain or async, wrapped by
    `guard_reward`; model names and reward models pass unchanged (TRL calls those itself)."""

    def guard(func: Any) -> Any:
        if isinstance(func, str | torch.nn.Module) or not callable(func):
            return func
        return guard_reward(func, timeout_s)

    return [guard(f) for f in reward_funcs] if isinstance(reward_funcs, list) else guard(reward_funcs)


TIMEOUT_FIX = "make it faster, or raise the bound with --reward_timeout (0: no bound)"
IN_PROCESS_KWARGS = frozenset({"environments"})
"""Keyword arguments that are live objects a reward may change (TRL's per-completion environments): a call that
gets them runs in this process, where the bound cannot stop code that holds the interpreter lock."""


class RewardTimeoutError(RewardError):
    """A reward call that did not return within its bound (a worker process running it was killed)."""

    def __init__(self, name: str, timeout_s: float, count: int, where: str = "") -> None:
        self.timeout_s, self.count, self.where = timeout_s, count, where
        super().__init__(name, f"did not return within {timeout_s:g} s ({count} completions{where})", TIMEOUT_FIX)

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable despite the four-part constructor."""
        return (type(self), (self.name, self.timeout_s, self.count, self.where))


def call_bounded(
    func: RewardFunc, name: str, timeout_s: float | None, completions: list[Any], kwargs: dict[str, Any]
) -> Any:
    """`func(completions, **kwargs)`, stopped after `timeout_s` seconds (RewardTimeoutError). Without a bound, and
    for `math_accuracy` on the main thread (which bounds each parse itself), it runs here. Otherwise it runs in
    the reward worker process, which is killed when the call overruns: a thread cannot stop code that never
    releases the interpreter lock (a backtracking regular expression). A reward the worker cannot load (a lambda,
    a closure, a function of `__main__`) or arguments that do not pickle run in a watched thread instead, with a
    one-time warning that the bound only holds for code that releases the lock."""
    on_main = threading.current_thread() is threading.main_thread()
    if not timeout_s or (on_main and getattr(func, "_rlsd_self_bounded", False)):
        return func(completions, **kwargs)
    blob = reward_worker.function_blob(func)
    if blob is None:
        reason = "it cannot be imported by reference (a lambda, a closure, or a function of the __main__ script)"
    elif kwargs.keys() & IN_PROCESS_KWARGS:
        reason = f"it gets live objects ({', '.join(sorted(kwargs.keys() & IN_PROCESS_KWARGS))}) it may change"
    elif blob in _NOT_LOADABLE:
        reason = _NOT_LOADABLE[blob]
    else:
        try:
            return call_in_worker(func, blob, timeout_s, completions, kwargs)
        except reward_worker.CallTimedOut:
            raise RewardTimeoutError(name, timeout_s, len(completions)) from None
        except reward_worker.NotSendable as err:
            reason = f"its arguments cannot be sent to the reward worker process ({err})"
        except reward_worker.LoadFailed as err:
            reason = _NOT_LOADABLE[blob] = f"the reward worker process cannot import it ({err})"
    _warn_in_thread(func, name, reason)
    return _call_in_thread(func, name, timeout_s, completions, kwargs)


_NOT_LOADABLE: dict[bytes, str] = {}
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def call_in_worker(
    func: RewardFunc, blob: bytes | None, timeout_s: float | None, completions: list[Any], kwargs: dict[str, Any]
) -> Any:
    """`func(completions, **kwargs)` in the reward worker process (see `rlsd.data.reward_worker`); calls of the
    callable keyword arguments (`log_metric`, `log_extra`) made there are replayed here, in order."""
    blob = blob if blob is not None else reward_worker.function_blob(func)
    if blob is None:
        raise ValueError(f"{func!r} cannot be run in the reward worker process (not importable by reference)")
    try:
        output, recorded = reward_worker.shared_worker().call(
            blob, completions, kwargs, timeout_s, torch.is_grad_enabled()
        )
    except reward_worker.WorkerDied as err:
        fix = "look for a crash or the out-of-memory killer in the system log"
        raise RewardError(getattr(func, "__name__", repr(func)), str(err), fix) from err
    except reward_worker.Unsendable as err:
        what = f"returned a {err}, which cannot be sent back from the reward worker process"
        fix = "return a list with one float (or None) per completion"
        raise RewardError(getattr(func, "__name__", repr(func)), what, fix) from None
    for key, args, call_kwargs in recorded:
        kwargs[key](*args, **call_kwargs)
    return output


def _warn_in_thread(func: RewardFunc, name: str, reason: str) -> None:
    """Warn once per function and reason that its time bound is enforced by a thread, which some code defeats."""
    try:
        reasons = _WARNED.setdefault(func, set())
    except TypeError:  # not weakly referenceable: warn every time rather than never
        reasons = set()
    if reason in reasons:
        return
    reasons.add(reason)
    logger.warning(
        "reward function %r runs in a thread of this process because %s: --reward_timeout cannot stop it while "
        "it holds the interpreter lock (a backtracking regular expression, a huge integer power); define it at "
        "module level in an importable module to run it in the reward worker process",
        name,
        reason,
    )


def _call_in_thread(
    func: RewardFunc, name: str, timeout_s: float, completions: list[Any], kwargs: dict[str, Any]
) -> Any:
    """`func(completions, **kwargs)` in a daemon thread, waited for at most `timeout_s` seconds: a function that
    overruns is left behind and RewardTimeoutError raised (if the waiting thread gets the interpreter lock back)."""
    grad_enabled = torch.is_grad_enabled()
    context = contextvars.copy_context()
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                box["value"] = context.run(func, completions, **kwargs)
        except BaseException as err:
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name=f"reward-{name}", daemon=True).start()
    if not done.wait(timeout_s):
        raise RewardTimeoutError(name, timeout_s, len(completions))
    if "error" in box:
        raise box["error"]
    return box["value"]


def checked_rewards(output: Any, name: str, expected: int) -> list[float | None]:
    """A reward function's output as a list of floats (None kept: not applicable); a scalar, a wrong length, or a
    string, NaN or inf value, or one beyond float32's range (TRL's rewards are float32) is refused naming the function
    and the row."""
    if hasattr(output, "tolist") and not isinstance(output, list | tuple):
        output = output.tolist()
    if not isinstance(output, list | tuple):
        raise RewardError(
            name,
            f"returned a {type(output).__name__} ({output!r:.40}), not a list of one reward per completion",
            "return a list with one float (or None) per completion",
        )
    if len(output) != expected:
        raise RewardError(name, f"returned {len(output)} rewards for {expected} completions", "return one each")
    rewards: list[float | None] = []
    for row, value in enumerate(output):
        if value is None:
            rewards.append(None)
            continue
        if isinstance(value, str) or not isinstance(value, numbers.Real):
            raise RewardError(
                name, f"returned a {type(value).__name__} ({value!r:.40}) at row {row}", "return floats (or None)"
            )
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise RewardError(
                name, f"returned {value} at row {row}", "return a finite float, or None when it does not apply"
            )
        check_reward_range(value, name, row)
        rewards.append(float(value))
    return rewards


def _thread_hint(err: Exception) -> str:
    """A fix for rewards that only work on the main thread (signal-based time-outs, such as math-verify's)."""
    text = str(err)
    if isinstance(err, ValueError) and ("signal" in text or "thread" in text):
        return (
            "it needs the main thread (signals); disable its own time-outs (math-verify: parsing_timeout=None, "
            "timeout_seconds=None), RLSD bounds the call with --reward_timeout, or pass --reward_timeout 0"
        )
    return ""


def _hanging_row(func: RewardFunc, name: str, timeout_s: float, completions: list[Any], kwargs: dict[str, Any]) -> str:
    """After a batch overran: re-run it one row at a time, each bounded, to name the first row that overruns alone.
    The search stops once it has spent `timeout_s` on rows that return (restarting the worker and loading the
    reward not counted), so it costs at most about twice the bound. Its words for the error message."""
    if len(completions) == 1:
        return "; row 0"
    worker = reward_worker.shared_worker()
    start, loading = time.monotonic(), worker.load_seconds
    for index in range(len(completions)):
        if time.monotonic() - start - (worker.load_seconds - loading) > timeout_s:  # worker restarts not counted
            break
        try:
            call_bounded(func, name, timeout_s, [completions[index]], _row_kwargs(kwargs, index, len(completions)))
        except RewardTimeoutError:
            return f"; row {index} alone did not return either"
        except Exception:
            continue
    return "; no single row was found to overrun alone"


def _row_kwargs(kwargs: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """The keyword arguments of one row: per-row lists cut to that row, the rest as they are."""
    return {key: [value[index]] if isinstance(value, list) and len(value) == count else value
            for key, value in kwargs.items()}  # fmt: skip


def _first_failing_row(
    func: RewardFunc, name: str, timeout_s: float | None, completions: list[Any], kwargs: dict[str, Any]
) -> int | None:
    """Re-run the reward one row at a time (each call bounded too) to find the row that raises."""
    for index in range(len(completions)):
        try:
            call_bounded(func, name, timeout_s, [completions[index]], _row_kwargs(kwargs, index, len(completions)))
        except RewardError:
            return None
        except Exception:
            return index
    return None


def reward_totals(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted total reward of each row of TRL's (B, n_funcs) rewards: NaN entries (a function abstained) count
    as 0, and a row where every function abstained stays NaN."""
    totals = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    totals[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return totals
