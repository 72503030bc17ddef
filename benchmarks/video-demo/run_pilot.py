"""The video demo's pre-registered pilot (`benchmarks/video-demo/preregistration.md`): GRPO alone from the video warm
start, evaluated on the pilot set (all 175 test-split clips outside the 500-problem held-out set: the
pre-registration's amendment 1), in regime R1 or R2.

    OMP_NUM_THREADS=1 python benchmarks/video-demo/run_pilot.py R1     # raw files in benchmarks/video-demo/pilot-R1/
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlsd.experiments.provenance import record_run
from rlsd.experiments.video_task import VideoDemoConfig, run_video_demo

REGIMES = {"R1": {"learning_rate": 5e-5}, "R2": {"learning_rate": 1e-4}}
"""The pre-registered regimes: R1 the vision demo's, R2 its RL learning rate doubled (everything else the same)."""


def main(name: str) -> None:
    out = Path(__file__).parent / f"pilot-{name}"
    config = VideoDemoConfig(methods=("grpo",), eval_set="pilot", eval_size=175, out=out, **REGIMES[name])
    started = time.perf_counter()
    summary = run_video_demo(config, progress=False, threads=1)
    record_run(out, ["python", "benchmarks/video-demo/run_pilot.py", name], time.perf_counter() - started)
    print({method: {k: v for k, v in s.items() if k != "correct"} for method, s in summary["methods"].items()})


if __name__ == "__main__":
    main(sys.argv[1])
