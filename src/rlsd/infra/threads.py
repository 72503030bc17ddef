"""How many torch threads a CPU run uses: chosen from the cores this process may run on and the load already on them.

Torch's default (one intra-op thread per core) is right on an idle machine and wrong on a busy one: with another
CPU-bound process on one of two cores, every parallel region of a small model waits at its barrier for the thread
that shares its core, and a run takes many times its idle time. One thread per core left free avoids that; a
competitor then costs at most its share of the machine. The busy cores are read from the CPU time the process's cores
spend on other work over half a second at the start; the 1-minute load average is the fallback where that cannot be
read (it lags by about a minute both ways: it misses a competitor that has just started and still counts one that has
just stopped, which made an idle run right after other work choose one thread).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def choose_threads(
    available: int,
    load: float | None,
    override: int | None = None,
    machine_cores: int | None = None,
    busy_now: float | None = None,
) -> int:
    """Threads for a run: `override` when given (>= 1), else the `available` cores less those other work keeps busy
    (rounded to the nearest core; at least 1 thread).

    `load` is the machine's recent count of runnable processes (the 1-minute load average; None when unknown),
    `machine_cores` the machine's core count when the process may use only some of them (the load then taken as
    spread evenly over all of them), and `busy_now` the cores of the process's own that other work keeps busy at
    this moment (None when unknown): the direct measurement counts when there is one, the lagging load average
    only without it."""
    if override is not None:
        if override < 1:
            raise ValueError(f"--threads must be at least 1, got {override}")
        return override
    available = max(1, available)
    share = max(load or 0.0, 0.0) * available / max(machine_cores or available, available)  # the load on our cores
    busy = share if busy_now is None else busy_now
    return max(1, available - math.floor(busy + 0.5))


def thread_count(text: str) -> int:
    """`--threads`'s argparse type: a whole number of at least 1."""
    import argparse

    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The cgroup v2 CPU quota in whole cores, rounded up ("200000 100000" -> 2); None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def busy_cores_now(window: float = 0.5, stat: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's cores other work keeps busy: their non-idle share of `window` seconds (during which
    this process sleeps) in `/proc/stat`, times their count; None where that file is missing."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    before = _cpu_times(stat, cpus)
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times(stat, cpus)
    if after is None or after[1] <= before[1]:
        return None
    return after[2] * (after[0] - before[0]) / (after[1] - before[1])


def _cpu_times(stat: Path, cpus: list[int] | None) -> tuple[int, int, int] | None:
    """(busy, total, cores) jiffies summed over the `cpuN` lines of `cpus` (None: all of them)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = cores = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
        busy, total, cores = busy + sum(ticks) - ticks[3] - ticks[4], total + sum(ticks), cores + 1
    return (busy, total, cores) if cores else None


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def pick_threads(override: int | None = None) -> tuple[int, str]:
    """(threads, one line saying why) for this process now: `override`, else `OMP_NUM_THREADS` when set, else
    `choose_threads` on the available cores and the current load."""
    available = available_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if override is None and env.isdigit() and int(env) > 0:
        return int(env), f"threads: {env} (of {available} available, from OMP_NUM_THREADS; --threads to override)"
    if override is not None:
        threads = choose_threads(available, None, override)
        return threads, f"threads: {threads} (of {available} available, from --threads; --threads to override)"
    load, now = load_average(), busy_cores_now()
    threads = choose_threads(available, load, machine_cores=os.cpu_count(), busy_now=now)
    seen = ", ".join(
        ([f"1-minute load average {load:.1f}"] if load is not None else [])
        + ([f"{now:.1f} of them busy with other work now"] if now is not None else [])
    )
    why = ("fewer: " if threads < available else "") + (seen or "load unknown")
    return threads, f"threads: {threads} (of {available} available, {why}; --threads to override)"


_INTEROP_SET = False


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (and as many inter-op threads, set once per process: torch
    refuses a second setting, or one after parallel work began); the earlier intra-op count is restored after."""
    import torch

    global _INTEROP_SET
    if not _INTEROP_SET:
        _INTEROP_SET = True
        with suppress(RuntimeError):  # already set, or inter-op work ran: the intra-op count is what matters
            torch.set_num_interop_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
