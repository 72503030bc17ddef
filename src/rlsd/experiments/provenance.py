"""Provenance written by the code: every raw result of `rlsd bench` and `rlsd demo` records the commit, the CPU model,
the torch thread count and the command line, and each run writes `timing.json` with its own wall time, so that no
document has to type these by hand (issue 26, item 6). Raw files written before this existed lack the fields; the
renderer says "not recorded" for them."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

NOT_RECORDED = "not recorded"
STARTED_AT_ENV = "RLSD_STARTED_AT"
"""Unix time (seconds) at which an enclosing command began (`make demo` sets it before creating the virtual
environment); `timing.json` then also records that command's wall time up to the end of the run."""
RAW_RESULTS = ("results.json", "cost.json", "summary.json")
"""The raw result files a bench or demo run writes; each carries a `provenance` record."""


def git_commit(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether tracked files differ from it) of the checkout holding this package, or (None, None)
    outside a git checkout."""
    folder = str(where or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where the file or the field is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def provenance(command: list[str]) -> dict[str, Any]:
    """What produced a raw result: the commit (and whether the checkout was modified), the CPU model, the torch thread
    count, the core count and the command line (`command`, e.g. `["rlsd", "bench", "methods", ...]`)."""
    import torch

    commit, dirty = git_commit()
    return {
        "commit": commit,
        "commit_dirty": dirty,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command_line": shlex.join(command),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def started_at() -> float | None:
    """`$RLSD_STARTED_AT` as Unix seconds (None when unset); a value that is not a number is refused by name."""
    value = os.environ.get(STARTED_AT_ENV)
    if value is None or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{STARTED_AT_ENV} must be Unix seconds (e.g. `date +%s.%N`), got {value!r}") from None


def write_timing(out: Path, command: list[str], wall_seconds: float) -> dict[str, Any]:
    """`out/timing.json`: the run's wall time and provenance, and the enclosing command's wall time when
    `$RLSD_STARTED_AT` says when it began (`make demo`: virtual environment and installs included)."""
    timing: dict[str, Any] = {"wall_seconds": wall_seconds, "provenance": provenance(command)}
    began = started_at()
    if began is not None:
        timing["enclosing_wall_seconds"] = time.time() - began
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def record_run(out: Path, command: list[str], wall_seconds: float) -> dict[str, Any]:
    """After a run: its provenance into each raw result file it wrote in `out` (`results.json`, `cost.json`,
    `summary.json`) and `timing.json` beside them; returns the provenance."""
    timing = write_timing(out, command, wall_seconds)
    for name in RAW_RESULTS:
        path = out / name
        if path.exists():
            result = json.loads(path.read_text())
            result["provenance"] = timing["provenance"]
            path.write_text(json.dumps(result, indent=2))
    return timing["provenance"]


# ------------------------------------------------------------------------------------------------ rendering
def describe(record: dict[str, Any] | None) -> dict[str, str]:
    """The provenance fields as table cells, "not recorded" for each one a raw file lacks."""
    record = record or {}
    commit = record.get("commit")
    if commit and record.get("commit_dirty"):
        commit = f"{commit[:7]} (modified)"
    threads = record.get("torch_threads")
    return {
        "commit": commit[:7] if commit and len(commit) == 40 else commit or NOT_RECORDED,
        "cpu": record.get("cpu_model") or NOT_RECORDED,
        "threads": NOT_RECORDED if threads is None else str(threads),
        "command": f"`{record['command_line']}`" if record.get("command_line") else NOT_RECORDED,
    }


def _wall(folder: Path) -> str:
    """The run's wall time from its `timing.json`, when the code wrote one."""
    path = folder / "timing.json"
    if not path.exists():
        return NOT_RECORDED
    timing = json.loads(path.read_text())
    if "provenance" not in timing:  # an older, hand-written record
        return "typed by hand"
    return f"{timing['wall_seconds']:.0f} s"


def render_provenance(root: Path) -> str:
    """Markdown: for every raw result under `benchmarks/`, the commit, CPU, thread count, command line and wall time
    its run recorded ("not recorded" for the files written before the bench recorded them)."""
    lines = [
        "| raw file | commit | CPU | torch threads | command line | wall time (timing.json) |",
        "|---|---|---|---|---|---|",
    ]
    paths = sorted(p for name in RAW_RESULTS for p in (root / "benchmarks").rglob(name))
    for path in paths:
        cells = describe(json.loads(path.read_text()).get("provenance"))
        lines.append(
            f"| `{path.relative_to(root / 'benchmarks').as_posix()}` | {cells['commit']} | {cells['cpu']} | "
            f"{cells['threads']} | {cells['command']} | {_wall(path.parent)} |"
        )
    return "\n".join(lines) + "\n"
