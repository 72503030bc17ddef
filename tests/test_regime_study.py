"""Issue 26's pre-registered analysis (`rlsd.experiments.regime_study`): endpoint, equivalence test, verdicts, gate."""

from __future__ import annotations

import json
import math

import pytest

from rlsd.experiments.regime_study import (
    oracle_gate,
    primary_endpoint,
    render_regime_long,
    seeds_needed,
    tost_p,
    verdicts,
)


def t2_sf(t: float) -> float:
    """The Student-t survival function at 2 degrees of freedom, in closed form."""
    return 0.5 - t / (2 * math.sqrt(t * t + 2))


def test_the_endpoint_is_the_mean_over_the_window_and_the_equivalence_p_is_the_larger_one_sided_p():
    rows = [{"kind": "eval", "method": "grpo", "seed": 0, "step": s, "pass_at_1": v}
            for s, v in ((0, 0.9), (10, 0.2), (50, 0.4), (100, 0.6), (110, 0.9))]  # fmt: skip
    assert primary_endpoint(rows, "grpo", 0) == pytest.approx(0.4)
    se = 0.01 / math.sqrt(3)  # diffs 0, +1, -1 points: mean 0, sd 1 point
    assert tost_p([0.0, 0.01, -0.01]) == pytest.approx(t2_sf(0.015 / se))  # 0.061: not shown equivalent at n = 3


def test_verdicts_are_holm_corrected_across_the_family():
    table = verdicts({"up": [0.05, 0.06, 0.07], "flat": [0.0, 0.001, -0.001], "noisy": [0.05, -0.05, 0.0]})
    up_p = 2 * t2_sf(0.06 / (0.01 / math.sqrt(3)))  # 0.0091, the smallest of three: x 3
    assert table["up"]["p_holm"] == pytest.approx(3 * up_p) and table["up"]["verdict"] == "better"
    flat_equiv = t2_sf(0.015 / (0.001 / math.sqrt(3)))  # 0.00074, the smallest TOST p of three: x 3
    assert table["flat"]["p_equiv_holm"] == pytest.approx(3 * flat_equiv) and table["flat"]["verdict"] == "equivalent"
    assert table["noisy"]["verdict"] == "inconclusive"
    assert oracle_gate([0.05, 0.06, 0.07]) and not oracle_gate([0.01, 0.02, 0.03])  # lower bound 3.5 / -0.5 points


def test_the_design_needs_more_seeds_at_a_larger_paired_sd():
    low, high = seeds_needed(0.015), seeds_needed(0.03)
    assert low["detect"] < high["detect"] and low["equivalence"] < high["equivalence"]
    assert 14 <= low["detect"] <= 18  # the normal approximation gives ((2.64 + 0.84) x 1.0)^2 = 12.1, t adds a few


def test_the_table_says_when_no_run_exists_and_renders_the_runs(tmp_path):
    assert render_regime_long(tmp_path).startswith("No run of the study yet")
    folder = tmp_path / "benchmarks" / "regime-long"
    folder.mkdir(parents=True)
    runs = [(m, s, base) for m in ("grpo", "oracle") for s, base in ((0, 0.2), (1, 0.3), (2, 0.25))]
    rows = [{"kind": "eval", "method": m, "seed": s, "step": step, "pass_at_1": base + (0.1 if m == "oracle" else 0)}
            for m, s, base in runs for step in (10, 100)]  # fmt: skip
    rows[-1]["pass_at_1"] += 0.02  # oracle seed 2 at step 100: its diffs are +10, +10, +11 points
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = render_regime_long(tmp_path)
    assert "| grpo | 3 | 25.0 |" in table and "| oracle | 3 | 35.3 | +10.3" in table and "better" in table


def test_the_pilot_table_shows_each_runs_share_of_groups_without_advantage(tmp_path):
    from rlsd.experiments.regime_study import render_regime_pilot

    assert render_regime_pilot(tmp_path).startswith("No pilot run yet")
    folder = tmp_path / "benchmarks" / "regime-long-pilot"
    folder.mkdir(parents=True)
    rows = [{"kind": "train", "method": "grpo", "seed": 0, "step": s, "reward": r, "frac_reward_zero_std": z}
            for s, r, z in ((1, 0.0, 1.0), (2, 0.02, 0.5))]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"initial_pass_at_1": 0.0, "final_pass_at_1": 0.01, "seconds_per_step": 9.04, "wall_seconds": 123.4}
    (folder / "results.json").write_text(json.dumps({"runs": {"grpo/0": summary}}))
    assert "| grpo | 0 | 2 | 0.0 -> 1.0 | 1.00 | 75.0 | 9.0 | 123 |" in render_regime_pilot(tmp_path)
