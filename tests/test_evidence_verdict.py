"""The README's "Does token credit help?" paragraph: its wording on hand-made numbers, and its numbers from a tiny tree
of raw files (paired differences and intervals by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsd.experiments.evidence import TABLES
from rlsd.experiments.evidence_verdict import credit_facts, credit_paragraph, render_credit_verdict

FACTS = {
    "rlsd": {
        "seeds": 4,
        "final": {"mean": -0.01, "low": -0.05, "high": 0.03, "detectable": 0.061, "paper_seeds": 20},
        "2nd half": {"mean": 0.002, "low": -0.021, "high": 0.025, "detectable": 0.034, "paper_seeds": 9},
    },
    "holm": {
        "families": 2,
        "comparisons": 7,
        "above": ["x, section 9"],
        "below": ["y, section 1", "z, section 1"],
        "rlsd_rows": 3,
        "rlsd_distinguishable": 0,
    },
    "localisation": {
        "completions": 100,
        "correct": 2,
        "located": 80,
        "contexts": {"answer": {"auc": 0.49, "ci": [0.45, 0.53]}},
    },
    "gate": {
        "study_seeds": 0,
        "pilot_methods": ["grpo", "oracle"],
        "pilot_seeds": 1,
        "pilot_steps": 10,
        "pass_start": 0.0,
        "pass_last": 0.02,
        "no_advantage": 0.95,
        "seconds_per_step": 36.0,
    },
    "study_seeds_needed": 2,
    "study_runs_per_seed": 3,
    "study_steps": 100,
}

EXPECTED = (
    "On the embedded task, RLSD minus GRPO paired over 4 seeds is -1.0 points [-5.0, +3.0] at the final step and +0.2 "
    "[-2.1, +2.5] on the second-half mean (95% t intervals); both intervals hold 0 and the paper's +2.3, so this is a "
    "null, not a negative: the smallest effect these seeds detect with 80% power is 6.1 / 3.4 points, and detecting "
    "+2.3 would take 20 / 9 seeds. Across BENCHMARKS.md section 4's 7 comparisons to GRPO in 2 families, on each "
    "family's primary endpoint after Holm's correction, 1 is above GRPO (x, section 9), 2 are below and the rest not "
    "distinguishable; 0 of the 3 RLSD-variant comparisons are distinguishable. In the pre-registered long regime "
    "(section 13) the self-teacher's Delta does not point at the error: its error-localisation AUC over 80 wrong "
    "completions is 0.490 [0.450, 0.530] shown the answer (0.5 is none, 0.8 was asked for), and the warm start solves "
    "2 of 100 sampled chains. The regime's positive control, oracle credit from the checker, could not be tested "
    "against the +-1.5-point margin: in the pilot (grpo and oracle, 1 seed, 10 steps) greedy pass@1 went from 0.0% "
    "to at most 2.0% and 95.0% of groups had no advantage at all, so the oracle had nothing to redistribute and the "
    "study stopped at its gate. What it cannot say: whether token credit helps anywhere, since no regime here has "
    "been shown to be one where credit can matter; the pre-registered study (2 paired seeds x 3 methods x 100 steps, "
    "about 6 core-hours of training alone at the pilot's mean seconds per step) was not run; and no method comparison "
    "has run on a GPU, nor on a real model over more than one seed (section 10).\n"
)


def test_the_paragraph_on_hand_made_numbers():
    assert credit_paragraph(FACTS) == EXPECTED  # 2 seeds x 3 methods x 100 steps x 36 s = 6 core-hours


def test_an_interval_that_excludes_zero_is_not_called_a_null():
    facts = json.loads(json.dumps(FACTS))
    facts["rlsd"]["final"].update(low=0.01, high=0.05)
    assert "the intervals do not hold both 0 and the paper's +2.3" in credit_paragraph(facts)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_numbers_come_from_the_raw_files(tmp_path):
    finals = {"grpo": [0.50, 0.60, 0.70], "rlsd": [0.52, 0.60, 0.74]}  # paired differences 0.02, 0, 0.04
    rows = [{"kind": "eval", "method": m, "seed": s, "step": step, "pass_at_1": 0.4 if step == 0 else finals[m][s]}
            for m in finals for s in range(3) for step in (0, 10, 20)]  # fmt: skip
    _write_rows(tmp_path / "benchmarks" / "methods" / "metrics.jsonl", rows)
    loc = {"completions": 8, "correct": 1, "wrong": 7, "wrong_located": 5,
           "contexts": {"answer": {"auc_mean": 0.5, "auc_ci95": [0.4, 0.6]}}}  # fmt: skip
    (tmp_path / "benchmarks" / "localisation-long").mkdir(parents=True)
    (tmp_path / "benchmarks" / "localisation-long" / "localisation.json").write_text(json.dumps(loc))
    pilot = tmp_path / "benchmarks" / "regime-long-pilot"
    runs = {f"{m}/0": {"initial_pass_at_1": 0.0, "final_pass_at_1": f, "seconds_per_step": t}
            for m, f, t in (("grpo", 0.01, 20.0), ("oracle", 0.02, 30.0))}  # fmt: skip
    _write_rows(pilot / "metrics.jsonl", [{"kind": "train", "method": m, "seed": 0, "step": step,
                                           "frac_reward_zero_std": z} for m in ("grpo", "oracle")
                                          for step, z in ((1, 1.0), (2, 0.5))])  # fmt: skip
    (pilot / "results.json").write_text(json.dumps({"runs": runs}))
    facts = credit_facts(tmp_path)
    final = facts["rlsd"]["final"]
    half = 4.302653 * 0.02 / 3**0.5  # t(2) x sd 0.02 / sqrt(3)
    assert facts["rlsd"]["seeds"] == 3
    assert final["mean"] == pytest.approx(0.02) and final["low"] == pytest.approx(0.02 - half, abs=1e-6)
    assert final["high"] == pytest.approx(0.02 + half, abs=1e-6)
    assert facts["holm"] == {"families": 1, "comparisons": 1, "above": [], "below": [], "rlsd_rows": 1,
                             "rlsd_distinguishable": 0}  # fmt: skip
    assert facts["localisation"] == {"completions": 8, "correct": 1, "located": 5,
                                     "contexts": {"answer": {"auc": 0.5, "ci": [0.4, 0.6]}}}  # fmt: skip
    gate = facts["gate"]
    assert gate["pilot_methods"] == ["grpo", "oracle"] and gate["pilot_steps"] == 2 and gate["pilot_seeds"] == 1
    assert gate["pass_last"] == 0.02 and gate["no_advantage"] == 0.75 and gate["seconds_per_step"] == 25.0
    assert render_credit_verdict(tmp_path) == credit_paragraph(facts)


def test_the_block_is_registered_and_placed_after_the_demo_section():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert TABLES["credit-verdict"] is render_credit_verdict
    demo, block, api = (text.index(s) for s in ("## What `make demo` shows", "<!-- table:credit-verdict -->",
                                                 "## Python API"))  # fmt: skip
    assert demo < block < api
