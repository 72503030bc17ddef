"""Pilot runs that chose the default regime of `rlsd demo` and `rlsd bench` (BENCHMARKS.md, section 0).

Each pilot is one seed of GRPO (and, for the chosen regime, RLSD and OPSD) from its own warm start, evaluated on
the *pilot* set (200 test-split problems disjoint from the 500 held-out ones), so that choosing the regime does not
touch the held-out numbers. Usage: `python benchmarks/pilot/run_pilot.py NAME [METHOD ...]`; writes
`benchmarks/pilot/NAME/metrics.jsonl` and `summary.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from rlsd.experiments.demo import DemoConfig, jsonable, train_method
from rlsd.experiments.task import TaskConfig, evaluation_problems
from rlsd.experiments.warmstart import WarmStartConfig, warm_start

PRODUCTS_FIRST = TaskConfig(semantics="products-first")
_WARM = dict(task=PRODUCTS_FIRST, steps=450, lr_schedule="constant", teacher_share=0.3)
PILOTS: dict[str, tuple[WarmStartConfig, dict]] = {
    "p1-hint0.2-ws450": (WarmStartConfig(**_WARM, hint_share=0.2), {}),
    "p2-hint0.2-ws300": (WarmStartConfig(**{**_WARM, "steps": 300}, hint_share=0.2), {}),
    "p3-hint0-ws450": (WarmStartConfig(**_WARM, hint_share=0.0), {}),
    "p4-hint0.2-ws450-lr1e-4": (WarmStartConfig(**_WARM, hint_share=0.2), {"learning_rate": 1e-4}),
}
"""The pre-registered pilots, in the order they are tried (BENCHMARKS.md, section 0)."""
PILOT_PROTOCOL = dict(steps=150, eval_every=25, eval_size=200, eval_set="pilot", sample_k=0, diagnostics_size=0,
                      learning_rate=5e-5,
                      warmup_steps=0, lambda_decay_steps=50)  # fmt: skip


def main(name: str, methods: list[str]) -> None:
    warm, overrides = PILOTS[name]
    out = Path(__file__).parent / name
    out.mkdir(parents=True, exist_ok=True)
    config = replace(DemoConfig(out=out / "runs", warm=warm), **{**PILOT_PROTOCOL, **overrides})
    started = time.perf_counter()
    warm_path = warm_start(warm)
    warm_seconds = time.perf_counter() - started
    problems = evaluation_problems(warm.task, config.eval_size, config.eval_set)
    metrics = out / "metrics.jsonl"
    done = {json.loads(line)["method"] for line in metrics.read_text().splitlines()} if metrics.exists() else set()

    def record(row: dict) -> None:
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    summaries = json.loads((out / "summary.json").read_text())["methods"] if (out / "summary.json").exists() else {}
    for method in methods:
        if method in done:
            continue
        _, summaries[method] = train_method(method, config, warm_path, problems, record, progress=False)
    summary = {"config": jsonable(asdict(config)), "warm_start_seconds": warm_seconds, "methods": summaries}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["grpo"])
