"""The GUI demo's pre-registered pilot (`benchmarks/gui-demo/preregistration.md`): GRPO alone from the GUI warm
start, evaluated on the pilot set (200 test-split screens outside the held-out set), in regime G1, G2 or G3.

    OMP_NUM_THREADS=1 python benchmarks/gui-demo/run_pilot.py G1     # raw files in benchmarks/gui-demo/pilot-G1/
    OMP_NUM_THREADS=1 python benchmarks/gui-demo/run_pilot.py G3 150 # G3 with the warm-start length the rule picked
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from rlsd.experiments.gui_demo import GuiDemoConfig, run_gui_demo
from rlsd.experiments.provenance import record_run

REGIMES = {"G1": {"learning_rate": 5e-5}, "G2": {"learning_rate": 2e-4}, "G3": {"learning_rate": 2e-4}}
"""The pre-registered regimes: G1 the vision demo's RL learning rate, G2 it x4 (the same warm start), G3 G2's with
another warm-start length (150 or 600 steps, by the rule)."""


def main(name: str, warm_steps: int | None = None) -> None:
    out = Path(__file__).parent / f"pilot-{name}"
    config = GuiDemoConfig(methods=("grpo",), eval_set="pilot", out=out, **REGIMES[name])
    if name == "G3":
        config.warm = replace(config.warm, steps=warm_steps)
    started = time.perf_counter()
    summary = run_gui_demo(config, progress=False, threads=1)
    argv = ["python", "benchmarks/gui-demo/run_pilot.py", *sys.argv[1:]]
    record_run(out, argv, time.perf_counter() - started)
    print({method: {k: v for k, v in s.items() if k != "correct"} for method, s in summary["methods"].items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
