"""The pre-registered pilot rule of the GUI and video demos (`rlsd.experiments.evidence_demos.pilot_verdict`) and its
rendered table, on hand-made curves and pilot folders."""

import json

import pytest

from rlsd.experiments.evidence_demos import pilot_verdict, render_pilots


def test_the_pilot_rule_is_the_window_mean_minus_the_warm_start_against_two_points():
    curve = {0: 0.10, 10: 0.0, 50: 0.11, 60: 0.12, 70: 0.13, 80: 0.12}  # window mean 0.12: exactly +2 points
    gain, passes = pilot_verdict(curve)
    assert gain == pytest.approx(0.02) and passes
    gain, passes = pilot_verdict({**curve, 80: 0.11})  # mean 0.1175: +1.75 points
    assert gain == pytest.approx(0.0175) and not passes


def test_a_pilot_that_stopped_before_the_window_is_named_not_assessed(tmp_path):
    with pytest.raises(ValueError, match=r"steps \[50, 60, 70, 80\]"):
        pilot_verdict({0: 0.1, 10: 0.2})
    for name, steps in (("pilot-A", (0, 50, 60, 70, 80)), ("pilot-B", (0, 10))):
        folder = tmp_path / "benchmarks" / "demo" / name
        folder.mkdir(parents=True)
        rows = [{"kind": "eval", "method": "grpo", "step": s, "pass_at_1": 0.1 + 0.01 * (s > 0)} for s in steps]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (folder / "summary.json").write_text(json.dumps({"warm_start_seconds": 5.0}))
        (folder / "timing.json").write_text(json.dumps({"wall_seconds": 60.0}))
    table = render_pilots(tmp_path, "demo").splitlines()
    assert table[2] == "| `pilot-A` | 0: 10.0 / 50: 11.0 / 60: 11.0 / 70: 11.0 / 80: 11.0 | +1.00 | fails | 60 (5) |"
    assert table[3] == "| `pilot-B` | 0: 10.0 / 10: 11.0 | n/a (stopped before step 80) | not assessed | 60 (5) |"
