"""Reliability v3, BAD item 3 (N-W14, N-W12): `--reward_timeout` stops a reward that never releases the interpreter
lock, because bounded rewards run in a worker process that is killed on overrun; `math_accuracy` works from any
thread because it runs in that process's main thread."""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest

from rlsd.data import reward_worker
from rlsd.data.rewards import guard_reward, math_accuracy
from rlsd.infra.validate import RewardError

PATHOLOGICAL = "a" * 32 + "b"
"""`(a+)+$` on this backtracks about 2**32 steps: minutes unbounded (never forever), so the test returns anyway."""


def backtracks(completions, **kwargs):
    """A reward whose regular expression backtracks exponentially on a row that ends in `b`."""
    return [1.0 if re.match(r"(a+)+$", text) else 0.0 for text in completions]


def worker_pid(completions, **kwargs):
    """The process id of whoever runs the reward, once per row."""
    return [float(os.getpid())] * len(completions)


def logs_a_metric(completions, log_metric, **kwargs):
    """A reward that logs through TRL's `log_metric` keyword argument."""
    log_metric("rewards/seen", float(len(completions)))
    return [0.5] * len(completions)


def raises_on_b(completions, **kwargs):
    """A reward that raises on the rows that contain a `b`."""
    return [1.0 / ("b" not in text) for text in completions]


def _in_thread(func, *args, **kwargs):
    """`func(*args, **kwargs)` called from a non-main thread: its result or its exception."""
    box = []

    def work():
        try:
            box.append(func(*args, **kwargs))
        except BaseException as err:
            box.append(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join()
    return box[0]


def test_a_backtracking_regex_is_stopped_and_the_row_named_then_the_worker_is_replaced():
    guarded = guard_reward(backtracks, 2)
    assert guarded(["aaa", "ab"]) == [1.0, 0.0]  # the common case: fast, in the worker
    with pytest.raises(RewardError, match=r"'backtracks' did not return within 2 s \(3 completions; row 1 alone"):
        guarded(["aaa", PATHOLOGICAL, "a"])  # N-W14: the thread-based bound never stopped this
    assert guarded(["aaa", "ab"]) == [1.0, 0.0]  # a fresh worker answers after the kill


def test_a_reward_after_a_timeout_runs_in_a_new_worker_process():
    pid = guard_reward(worker_pid, 30)
    before = pid(["x"])[0]
    assert before != os.getpid()  # bounded rewards run in the worker process
    with pytest.raises(RewardError, match=r"'backtracks' did not return within 2 s \(1 completions; row 0\)"):
        guard_reward(backtracks, 2)([PATHOLOGICAL])
    after = pid(["x", "y"])
    assert after[0] != before and after[0] != os.getpid()


def test_no_bound_runs_in_this_process():
    assert guard_reward(worker_pid, 0)(["x"]) == [float(os.getpid())]  # --reward_timeout 0: no bound, no hop
    assert guard_reward(worker_pid, None)(["x"]) == [float(os.getpid())]


def test_math_accuracy_from_a_thread_runs_with_its_bounds(caplog):
    # N-W12: off the main thread math-verify ran without its signal bounds; this tower held the interpreter lock
    # for minutes (9^{9^{9^{9}}}: for ever); in the worker's main thread a 2 s bound stops each parse
    tower = "\\boxed{9^{9^{8}}}"
    logged = {}
    with caplog.at_level(logging.WARNING):
        rewards = _in_thread(math_accuracy, [tower, "\\boxed{42}", "\\boxed{41}"], ["1", "42", "42"],
                             log_metric=lambda key, value: logged.update({key: value}))  # fmt: skip
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]  # math-verify kept its bounds
    assert rewards == [0.0, 1.0, 0.0]
    assert logged == {"rewards/math_unparseable": 0.0}  # logged in the worker, replayed here
    assert _in_thread(guard_reward(math_accuracy, 30), ["\\boxed{42}", "\\boxed{7}"], solution=["42", "42"]) == [1, 0]


def test_a_reward_in_the_worker_keeps_the_guard_messages_and_log_metric():
    logged = []
    guarded = guard_reward(logs_a_metric, 30)
    assert guarded(["a", "b"], log_metric=lambda key, value: logged.append((key, value))) == [0.5, 0.5]
    assert logged == [("rewards/seen", 2.0)]
    with pytest.raises(RewardError, match=r"'raises_on_b' raised on row 1: ZeroDivisionError: float division"):
        guard_reward(raises_on_b, 30)(["a", "b", "c"])


def test_a_lambda_falls_back_to_a_thread_with_one_warning(caplog):
    reward = guard_reward(lambda completions, **kwargs: [0.0] * len(completions), 30)
    with caplog.at_level(logging.WARNING, logger="rlsd.data.rewards"):
        assert reward(["a"]) == [0.0] and reward(["b"]) == [0.0]
    warnings = [r.getMessage() for r in caplog.records if "cannot stop it" in r.getMessage()]
    assert len(warnings) == 1 and "'<lambda>'" in warnings[0] and "module level" in warnings[0]
    assert reward_worker.function_blob(backtracks) is not None and reward_worker.function_blob(reward) is None


def exits(completions, **kwargs):
    """A reward that takes its process down (as a crash or the out-of-memory killer would)."""
    os._exit(3)


def test_a_reward_that_kills_its_process_is_named_and_the_next_call_works():
    with pytest.raises(RewardError, match=r"'exits' the reward worker process exited \(code 3\) while running it"):
        guard_reward(exits, 30)(["a"])
    assert guard_reward(backtracks, 30)(["aa"]) == [1.0]


def test_arguments_that_do_not_pickle_fall_back_to_a_thread(caplog):
    with caplog.at_level(logging.WARNING, logger="rlsd.data.rewards"):
        assert guard_reward(worker_pid, 30)(["x"], lock=threading.Lock()) == [float(os.getpid())]
    assert any("cannot be sent to the reward worker process" in r.getMessage() for r in caplog.records)
