"""The engines' tables in BENCHMARKS.md (section 15): the cost of a vLLM-served teacher against the in-trainer
teacher, rendered from `benchmarks/served-teacher/results.json` (written by `benchmarks/served-teacher/run.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlsd.experiments.provenance import describe

SERVED_TEACHER = Path("benchmarks") / "served-teacher" / "results.json"
LABELS = {"trainer": 'in-trainer (`teacher_backend="trainer"`)', "vllm": 'served (`teacher_backend="vllm"`)'}


def _row(name: str, result: dict[str, Any]) -> str:
    """One backend's medians and their ratios to the in-trainer teacher's."""
    steps, fixed = result["step_medians"], result["fixed_batch"]["pass_s_median"]
    step, teacher, passed = steps[name]["step_s"], steps[name]["teacher_s"], fixed[name]
    ratios = (step / steps["trainer"]["step_s"], teacher / steps["trainer"]["teacher_s"], passed / fixed["trainer"])
    return (
        f"| {LABELS[name]} | {step:.3f} | {teacher:.3f} | {passed:.3f} | "
        + " | ".join(f"{r:.2f}" for r in ratios)
        + " |"
    )


def render_served_teacher(root: Path) -> str:
    """Markdown: per teacher backend, the median step, the median teacher pass within a step and the median teacher
    pass on one fixed batch (seconds, and as ratios to the in-trainer teacher), then the run's settings, the log-prob
    gap on the fixed batch and the provenance; a line saying so while no run exists."""
    path = root / SERVED_TEACHER
    if not path.exists():
        return f"No run yet (`{SERVED_TEACHER.as_posix()}` is absent).\n"
    result = json.loads(path.read_text())
    settings, fixed, cells = result["settings"], result["fixed_batch"], describe(result.get("provenance"))
    versions = result["versions"]
    lines = [
        "| teacher | s / step | teacher pass s (in the step) | teacher pass s (fixed batch) | step ratio | "
        "teacher-pass ratio (in the step) | teacher-pass ratio (fixed batch) |",
        "|---|---|---|---|---|---|---|",
        *(_row(name, result) for name in ("trainer", "vllm")),
        "",
        f"Medians over {settings['measured_steps_per_backend']} steps per backend (alternating, after "
        f"{settings['warmup_steps']} warm-up steps) and {settings['measured_passes_per_backend']} fixed-batch passes "
        f"per backend (alternating, after {settings['warmup_passes']} each); {settings['model']}, "
        f"{settings['batch']} completions of {settings['max_completion_length']} tokens per step. Served vs "
        f"in-trainer log-probs on the fixed batch ({fixed['tokens']} tokens): max gap {fixed['logp_gap_max']:.4f}, "
        f"mean {fixed['logp_gap_mean']:.4f} nats. vLLM {versions['vllm']}, torch {versions['torch']}; "
        f"engine start {result['engine_start_s']:.0f} s, run {result['wall_s']:.0f} s; commit {cells['commit']}, "
        f"{cells['cpu']}, {cells['threads']} torch thread(s), {cells['command']} "
        f"(OMP_NUM_THREADS={result['provenance'].get('omp_num_threads')}).",
    ]
    return "\n".join(lines) + "\n"
