"""The demo's thread count: chosen from the cores available and the load on them, overridable, set and restored."""

from __future__ import annotations

import pytest
import torch

from rlsd.infra import threads
from rlsd.infra.threads import (
    _cgroup_cpu_quota,
    _cpu_times,
    choose_threads,
    pick_threads,
    thread_count,
    torch_threads,
)


@pytest.mark.parametrize(
    ("available", "load", "override", "machine", "expected"),
    [
        (2, 0.0, None, None, 2),  # idle 2-core machine: both cores
        (2, 0.3, None, None, 2),  # a little background work is not a competitor
        (2, 1.0, None, None, 1),  # one CPU-bound competitor on 2 cores: one thread, never two
        (2, 1.6, None, None, 1),
        (2, 9.4, None, None, 1),  # heavily loaded: still at least one
        (8, 2.2, None, None, 6),
        (1, 0.0, None, None, 1),
        (4, None, None, None, 4),  # load unknown: every available core
        (2, 8.0, None, 64, 2),  # 2 cores of a 64-core host: the host's load spread over all of its cores
        (2, 48.0, None, 64, 1),
        (2, 1.0, 2, None, 2),  # --threads wins over the load
        (2, 0.0, 5, None, 5),  # ... and over the core count
    ],
)
def test_choose_threads_from_cores_load_and_override(available, load, override, machine, expected):
    assert choose_threads(available, load, override, machine_cores=machine) == expected


@pytest.mark.parametrize(
    ("load", "busy_now", "expected"),
    [
        (0.1, 0.0, 2),  # idle
        (0.2, 1.0, 1),  # a competitor started seconds ago: the load average has not seen it yet, /proc/stat has
        (0.1, 0.6, 1),  # a competitor at 60% of a core: one thread still
        (1.9, 0.0, 2),  # other work just stopped: the lagging load average still counts it, /proc/stat does not
        (0.1, None, 2),  # busy cores unknown: the load average alone
        (1.2, None, 1),  # busy cores unknown, a competitor in the load average
    ],
)
def test_choose_threads_trusts_the_busy_cores_now_over_the_lagging_load_average(load, busy_now, expected):
    assert choose_threads(2, load, busy_now=busy_now) == expected


def test_choose_threads_refuses_fewer_than_one():
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(2, 0.0, override=0)


def test_thread_count_flag_type():
    import argparse

    assert thread_count("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            thread_count(bad)


def test_cgroup_quota_in_whole_cores(tmp_path):
    path = tmp_path / "cpu.max"
    for text, expected in (("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)):
        path.write_text(text)
        assert _cgroup_cpu_quota(path) == expected
    assert _cgroup_cpu_quota(tmp_path / "missing") is None


def test_cpu_times_sum_the_process_cores(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 10 150 10 0 0 0 0 0\ncpu0 10 0 5 80 5 0 0 0 0 0\ncpu1 20 0 5 70 5 0 0 0 0 0\nintr 1 2\n"
    )
    assert _cpu_times(stat, None) == (40, 200, 2)  # busy excludes idle and iowait
    assert _cpu_times(stat, [1]) == (25, 100, 1)
    assert _cpu_times(tmp_path / "missing", None) is None


def test_pick_threads_says_where_the_count_came_from(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 0.2)
    monkeypatch.setattr(threads, "busy_cores_now", lambda: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count, line = pick_threads()
    assert count == 1 and line.startswith("threads: 1 (of 2 available, fewer: ") and "--threads to override" in line
    assert "load average 0.2" in line and "1.0 of them busy" in line
    monkeypatch.setattr(threads, "busy_cores_now", lambda: 0.1)
    assert pick_threads()[0] == 2
    assert pick_threads(2) == (2, "threads: 2 (of 2 available, from --threads; --threads to override)")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert pick_threads()[0] == 2 and "OMP_NUM_THREADS" in pick_threads()[1]
    assert pick_threads(1)[0] == 1  # --threads over the environment


def test_torch_threads_sets_and_restores_the_intra_op_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
