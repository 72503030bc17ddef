"""Progress output for long CPU runs: a line as each phase begins, and bars that keep ticking through a slow step."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


class Phases:
    """Prints one line as each phase of a run begins, with the seconds since the run began: to stdout, flushed at
    once (a piped stdout is block-buffered), above any open progress bar."""

    def __init__(self) -> None:
        self.began = time.perf_counter()

    def __call__(self, text: str) -> None:
        tqdm.write(f"[{time.perf_counter() - self.began:4.0f} s] {text}", file=sys.stdout)
        sys.stdout.flush()


@contextmanager
def ticking(bar: Any, every: float = 5.0) -> Iterator[Any]:
    """Redraws `bar` every `every` seconds while the block runs, so that its elapsed time moves during an iteration
    longer than that (a disabled bar draws nothing)."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            bar.refresh()

    thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
