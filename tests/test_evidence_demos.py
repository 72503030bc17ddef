"""The one-seed demo tables of BENCHMARKS.md section 14 (`rlsd.experiments.evidence_demos`), on hand-made raw files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsd.experiments.evidence_demos import render_demo_run


def _method(initial: float, final: float, **extra: float) -> dict[str, float]:
    return {"initial_pass_at_1": initial, "final_pass_at_1": final, "peak_pass_at_1": final, "peak_step": 10,
            "seconds_per_step": 0.5, "wall_seconds": 12.0, **extra}  # fmt: skip


def _write(root: Path, methods: dict[str, dict[str, float]], outcomes: dict[str, tuple[str, str]]) -> None:
    """A demo folder: its summary, eval rows at steps 0 and 10 with the given outcome strings, one train row each."""
    folder = root / "benchmarks" / "demo-x"
    folder.mkdir(parents=True)
    provenance = {"commit": "a" * 40, "commit_dirty": True, "cpu_model": "CPU", "torch_threads": 2, "cpu_count": 2,
                  "command_line": "rlsd demo --task agent"}  # fmt: skip
    config = {"seed": 0, "steps": 10, "prompts_per_step": 4, "num_generations": 8, "eval_size": 10, "eval_every": 10}
    summary = {"task": "agent", "config": config, "warm_start_seconds": 500.0, "total_seconds": 700.0,
               "methods": methods, "provenance": provenance}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "timing.json").write_text(json.dumps({"wall_seconds": 701.0, "provenance": provenance}))
    rows = []
    for method, (start, end) in outcomes.items():
        rows += [{"kind": "eval", "method": method, "seed": 0, "step": 0, "correct": start},
                 {"kind": "eval", "method": method, "seed": 0, "step": 10, "correct": end},
                 {"kind": "train", "method": method, "seed": 0, "step": 1, "step_time": 0.25}]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_mcnemar_cells_target_and_verdict_by_hand(tmp_path):
    start = "0000000000"
    # GRPO gains problems 0-5 (6 / 0: two-sided exact p = 2 * 0.5**6 = 0.03125); RLSD solves 0-2 and 6-9: against
    # GRPO's final it is better on 6-9 and worse on 3-5 (4 / 3: p = 1), one comparison so Holm p = p.
    _write(tmp_path, {"grpo": _method(0.0, 0.6, final_tool_call_rate=0.9),
                      "rlsd": _method(0.0, 0.7, final_tool_call_rate=0.8)},
           {"grpo": (start, "1111110000"), "rlsd": (start, "1110001111")})  # fmt: skip
    text = render_demo_run(tmp_path, "demo-x", target_seconds=600.0)
    assert "| grpo | 0.0 | 60.0 | 60.0 (10) | 90.0 | 6 / 0, p = 0.031 | baseline | 0.50 (0.25-0.25) | 12 |" in text
    assert "| rlsd | 0.0 | 70.0 | 70.0 (10) | 80.0 | 7 / 0, p = 0.016 | 4 / 3, p = 1.000 (1.000) |" in text
    assert "at commit aaaaaaa (modified)" in text and "700 s in all, 500 s of it the warm start" in text
    assert "over the issue's target of 600 s" in text
    assert "Holm over 1 method): no method's final outcomes are distinguishable from GRPO's" in text


def test_a_demo_without_grpo_is_refused(tmp_path):
    _write(tmp_path, {"rlsd": _method(0.0, 0.1)}, {"rlsd": ("0", "1")})
    with pytest.raises(ValueError, match=r"demo-x/summary\.json: no 'grpo' row"):
        render_demo_run(tmp_path, "demo-x")
