"""The README's one-paragraph answer to "does token credit help?" (issue 26), rendered by `rlsd bench report` from the
same raw files as BENCHMARKS.md sections 4 and 13, so that none of its numbers is typed by hand.

`credit_facts` gathers the numbers from `benchmarks/`; `credit_paragraph` words them (a pure function, pinned by a
test on hand-made facts); `render_credit_verdict` is the two together, registered as the table `credit-verdict`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rlsd.experiments.regime_study import FAMILY, MARGIN, WINDOW, oracle_gate, primary_endpoint, seeds_needed
from rlsd.experiments.verdicts import ALPHA, FAMILIES, POWER, detectable_effect, family_tests, verdict

PAPER_GAIN = 0.0232
"""The paper's RLSD minus GRPO (56.18 against 53.86 points, specification section 2.4)."""
PLANNING_SD = 0.021
"""Section 13's planning SD of the paired primary endpoint (the embedded regime's second-half paired SD)."""


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seeds_for(effect: float, sd: float) -> int:
    """Paired seeds a two-sided t-test at 5% needs for 80% power against `effect` at paired SD `sd` (statsmodels)."""
    from statsmodels.stats.power import TTestPower

    return math.ceil(TTestPower().solve_power(effect_size=effect / sd, alpha=ALPHA, power=POWER))


def _rlsd_facts(root: Path) -> dict[str, Any]:
    """RLSD minus GRPO on section 1's seeds, per endpoint: interval, detectable effect, seeds for the paper's gain."""
    test = next(t for t in family_tests(_rows(root / "benchmarks" / "methods" / "metrics.jsonl"))
                if t["method"] == "rlsd")  # fmt: skip
    out: dict[str, Any] = {"seeds": test["seeds"]}
    for endpoint in ("final", "2nd half"):
        t = test[endpoint]
        out[endpoint] = {"mean": t["mean"], "low": t["low"], "high": t["high"],
                         "detectable": detectable_effect(t["sd"], test["seeds"]),
                         "paper_seeds": seeds_for(PAPER_GAIN, t["sd"])}  # fmt: skip
    return out


def _holm_facts(root: Path) -> dict[str, Any]:
    """Every comparison to GRPO of section 4's families, on each family's primary endpoint, after Holm."""
    above, below, total, families, rlsd_rows = [], [], 0, 0, []
    for label, folder, primary in FAMILIES:
        path = root / "benchmarks" / folder / "metrics.jsonl"
        if not path.exists():
            continue
        families += 1
        for t in family_tests(_rows(path)):
            word = verdict(t[primary]["mean"], t[primary]["holm"])
            total += 1
            name = f"{t['method']}, {label}"
            if word == "above GRPO":
                above.append(name)
            elif word == "below GRPO":
                below.append(name)
            if t["method"].startswith("rlsd"):
                rlsd_rows.append(word)
    distinguishable = sum(word != "not distinguishable" for word in rlsd_rows)
    return {"families": families, "comparisons": total, "above": above, "below": below,
            "rlsd_rows": len(rlsd_rows), "rlsd_distinguishable": distinguishable}  # fmt: skip


def _localisation_facts(root: Path) -> dict[str, Any] | None:
    path = root / "benchmarks" / "localisation-long" / "localisation.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return {"completions": result["completions"], "correct": result["correct"], "located": result["wrong_located"],
            "contexts": {name: {"auc": row["auc_mean"], "ci": row["auc_ci95"]}
                         for name, row in result["contexts"].items()}}  # fmt: skip


def _gate_facts(root: Path) -> dict[str, Any]:
    """The oracle gate from the study's raw file when GRPO and the oracle share seeds there, else the pilot's facts."""
    study = root / "benchmarks" / "regime-long" / "metrics.jsonl"
    if study.exists():
        rows = _rows(study)
        done = {(r["method"], r["seed"]) for r in rows if r.get("kind") == "eval" and r["step"] >= WINDOW[1]}
        seeds = sorted(s for m, s in done if m == "oracle" and ("grpo", s) in done)
        if len(seeds) > 1:
            diffs = [primary_endpoint(rows, "oracle", s) - primary_endpoint(rows, "grpo", s) for s in seeds]
            return {"study_seeds": len(seeds), "passes": oracle_gate(diffs), "diff": statistics.mean(diffs)}
    pilot = root / "benchmarks" / "regime-long-pilot"
    runs = json.loads((pilot / "results.json").read_text())["runs"]
    train = [r for r in _rows(pilot / "metrics.jsonl") if r.get("kind") == "train"]
    return {
        "study_seeds": 0,
        "pilot_methods": list(dict.fromkeys(key.rsplit("/", 1)[0] for key in runs)),
        "pilot_seeds": len({key.rsplit("/", 1)[1] for key in runs}),
        "pilot_steps": max(r["step"] for r in train),
        "pass_start": max(run["initial_pass_at_1"] for run in runs.values()),
        "pass_last": max(run["final_pass_at_1"] for run in runs.values()),
        "no_advantage": statistics.mean(r["frac_reward_zero_std"] for r in train),
        "seconds_per_step": statistics.mean(run["seconds_per_step"] for run in runs.values()),
    }


def credit_facts(root: Path) -> dict[str, Any]:
    """Every number the paragraph states, from the raw files under `root/benchmarks/`."""
    return {"rlsd": _rlsd_facts(root), "holm": _holm_facts(root), "localisation": _localisation_facts(root),
            "gate": _gate_facts(root), "study_seeds_needed": max(seeds_needed(PLANNING_SD).values()),
            "study_runs_per_seed": 1 + len(FAMILY), "study_steps": WINDOW[1]}  # fmt: skip


def _pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def _ci(low: float, high: float) -> str:
    return f"[{_pts(low)}, {_pts(high)}]"


def _rlsd_sentence(r: dict[str, Any]) -> str:
    final, half = r["final"], r["2nd half"]
    paper = _pts(PAPER_GAIN)
    inside = all(e["low"] <= PAPER_GAIN <= e["high"] for e in (final, half))
    reading = (f"both intervals hold 0 and the paper's {paper}, so this is a null, not a negative"
               if inside and all(e["low"] <= 0 <= e["high"] for e in (final, half))
               else f"the intervals do not hold both 0 and the paper's {paper}")  # fmt: skip
    return (
        f"On the embedded task, RLSD minus GRPO paired over {r['seeds']} seeds is {_pts(final['mean'])} points "
        f"{_ci(final['low'], final['high'])} at the final step and {_pts(half['mean'])} "
        f"{_ci(half['low'], half['high'])} on the second-half mean (95% t intervals); {reading}: the smallest "
        f"effect these seeds detect with 80% power is {100 * final['detectable']:.1f} / "
        f"{100 * half['detectable']:.1f} points, and detecting {paper} would take {final['paper_seeds']} / "
        f"{half['paper_seeds']} seeds."
    )


def _holm_sentence(h: dict[str, Any]) -> str:
    above = f" ({'; '.join(h['above'])})" if h["above"] else ""
    return (
        f"Across BENCHMARKS.md section 4's {h['comparisons']} comparisons to GRPO in {h['families']} families, on "
        f"each family's primary endpoint after Holm's correction, {_count(len(h['above']))} above GRPO{above}, "
        f"{_count(len(h['below']))} below and the rest not distinguishable; "
        f"{h['rlsd_distinguishable']} of the {h['rlsd_rows']} RLSD-variant comparisons are distinguishable."
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _count(n: int) -> str:
    return f"{n} is" if n == 1 else f"{n} are"


def _localisation_sentence(loc: dict[str, Any] | None) -> str:
    if loc is None:
        return "The error-localisation diagnostic of the long regime has not been measured."
    parts = [f"{auc['auc']:.3f}" + (f" [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" if auc["ci"] else "")
             + f" shown the {name}" for name, auc in loc["contexts"].items()]  # fmt: skip
    contexts = loc["contexts"].values()
    reading = "is not shown to point at the error"
    if all(auc["ci"] and auc["ci"][0] <= 0.5 <= auc["ci"][1] for auc in contexts):
        reading = "does not point at the error"
    elif all(auc["ci"] and auc["ci"][0] >= 0.8 for auc in contexts):
        reading = "points at the error"
    return (
        f"In the pre-registered long regime (section 13) the self-teacher's Delta {reading}: its "
        f"error-localisation AUC over {loc['located']} wrong completions is {' and '.join(parts)} (0.5 is none, "
        f"0.8 was asked for), and the warm start solves {loc['correct']} of {loc['completions']} sampled chains."
    )


def _gate_sentence(g: dict[str, Any]) -> str:
    if g["study_seeds"]:
        word = "passes" if g["passes"] else "does not pass"
        return (
            f"The oracle positive control {word} its gate over {g['study_seeds']} paired seeds (mean "
            f"{_pts(g['diff'])} points against the +-{100 * MARGIN:.1f}-point margin)."
        )
    return (
        f"The regime's positive control, oracle credit from the checker, could not be tested against the "
        f"+-{100 * MARGIN:.1f}-point margin: in the pilot ({' and '.join(g['pilot_methods'])}, "
        f"{_plural(g['pilot_seeds'], 'seed')}, "
        f"{g['pilot_steps']} steps) greedy pass@1 went from {100 * g['pass_start']:.1f}% to at most "
        f"{100 * g['pass_last']:.1f}% and {100 * g['no_advantage']:.1f}% of groups had no advantage at all, so "
        f"the oracle had nothing to redistribute and the study stopped at its gate."
    )


def credit_paragraph(facts: dict[str, Any]) -> str:
    """The paragraph from `credit_facts`' numbers: what the project can say, then what it cannot."""
    g = facts["gate"]
    runs = facts["study_seeds_needed"] * facts["study_runs_per_seed"]
    cost = ""
    if "seconds_per_step" in g:
        hours = runs * facts["study_steps"] * g["seconds_per_step"] / 3600
        cost = f", about {hours:.0f} core-hours of training alone at the pilot's mean seconds per step"
    cannot = (
        "What it cannot say: anything outside section 13's regime, whose study has run; no method comparison has run "
        "on a GPU, nor on a real model over more than one seed (section 10)."
    )
    if not g["study_seeds"]:
        cannot = (
            f"What it cannot say: whether token credit helps anywhere, since no regime here has been shown to be "
            f"one where credit can matter; the pre-registered study ({facts['study_seeds_needed']} paired seeds x "
            f"{facts['study_runs_per_seed']} methods x {facts['study_steps']} steps{cost}) was not run; and no "
            f"method comparison has run on a GPU, nor on a real model over more than one seed (section 10)."
        )
    body = " ".join([_rlsd_sentence(facts["rlsd"]), _holm_sentence(facts["holm"]),
                     _localisation_sentence(facts["localisation"]), _gate_sentence(g), cannot])  # fmt: skip
    return body + "\n"


def render_credit_verdict(root: Path) -> str:
    """The README's `credit-verdict` block."""
    return credit_paragraph(credit_facts(root))
