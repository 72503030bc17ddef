"""Verdicts over families of comparisons: paired t-tests against GRPO (scipy), Holm's step-down correction within each
family (statsmodels' `multipletests`), the smallest effect each design could detect (statsmodels' t-test power), and
the exact McNemar test of a one-seed demo's per-problem gains. Rendered into BENCHMARKS.md by `rlsd bench report`."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ALPHA = 0.05
POWER = 0.8

FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("section 1", "methods", "final"),
    ("section 6", "study", "2nd half"),
    ("section 7", "family", "final"),
    ("section 11", "teachers", "final"),
    ("section 12", "generated", "final"),
)
"""(label, folder under benchmarks/, primary endpoint as its protocol fixed it): each folder's comparisons to GRPO
form one family, corrected together, per endpoint."""
ENDPOINTS = ("final", "2nd half")


# ------------------------------------------------------------------------------------------------ statistics
def paired_test(diffs: list[float]) -> tuple[float, float, float, float]:
    """Mean of paired differences, its two-sided 95% t interval and the one-sample t-test's p against 0 (NaN bounds
    and p for fewer than two pairs; p = 1 when every difference is 0)."""
    from scipy import stats

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(diffs)
    if sd == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=sd / math.sqrt(len(diffs)))
    return mean, float(low), float(high), float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels' `multipletests(method="holm")`); NaN entries stay NaN and are not counted
    in the family."""
    from statsmodels.stats.multitest import multipletests

    present = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    if present:
        corrected = multipletests([pvalues[i] for i in present], alpha=ALPHA, method="holm")[1]
        for i, value in zip(present, corrected, strict=True):
            adjusted[i] = float(value)
    return adjusted


def detectable_effect(sd: float, n: int) -> float:
    """The paired difference a two-sided one-sample t-test at 5% detects with 80% power over `n` pairs whose
    differences have standard deviation `sd` (statsmodels' `TTestPower`); NaN below two pairs."""
    from statsmodels.stats.power import TTestPower

    if n < 2:
        return math.nan
    return float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=ALPHA, power=POWER)) * sd


def verdict(mean: float, adjusted_p: float) -> str:
    """The verdict after Holm: above or below GRPO when the adjusted p is under 5%, else "not distinguishable"."""
    if math.isnan(adjusted_p):
        return "n/a (1 seed)"
    if adjusted_p >= ALPHA:
        return "not distinguishable"
    return "above GRPO" if mean > 0 else "below GRPO"


def mcnemar_exact(before: str, after: str) -> tuple[int, int, float]:
    """(problems gained, problems lost, exact two-sided McNemar p) between two 0/1 outcome strings of the same
    problems: a binomial test of the gains among the discordant problems (scipy)."""
    from scipy import stats

    if len(before) != len(after):
        raise ValueError(f"outcome strings differ in length: {len(before)} against {len(after)}")
    gained = sum(a == "0" and b == "1" for a, b in zip(before, after, strict=True))
    lost = sum(a == "1" and b == "0" for a, b in zip(before, after, strict=True))
    p = float(stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return gained, lost, p


# ------------------------------------------------------------------------------------------------ rendering
def _endpoints(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """method -> seed -> {"final": pass@1 at the last evaluation, "2nd half": mean over evaluations at steps >= half
    of the last}."""
    curves: dict[str, dict[int, dict[int, float]]] = {}
    for r in rows:
        if r.get("kind") == "eval":
            curves.setdefault(r["method"], {}).setdefault(r["seed"], {})[r["step"]] = r["pass_at_1"]
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for method, by_seed in curves.items():
        for seed, curve in by_seed.items():
            last = max(curve)
            half = statistics.mean(v for s, v in curve.items() if s >= last / 2)
            scores.setdefault(method, {})[seed] = {"final": curve[last], "2nd half": half}
    return scores


def family_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every method against GRPO on the seeds both ran: per endpoint the paired test and the Holm-adjusted p over
    the family, and the standard deviation of the differences."""
    scores = _endpoints(rows)
    grpo = scores.get("grpo", {})
    tests = []
    for method, by_seed in scores.items():
        if method == "grpo":
            continue
        seeds = sorted(set(by_seed) & set(grpo))
        test: dict[str, Any] = {"method": method, "seeds": len(seeds)}
        for endpoint in ENDPOINTS:
            diffs = [by_seed[s][endpoint] - grpo[s][endpoint] for s in seeds]
            test[endpoint] = dict(zip(("mean", "low", "high", "p"), paired_test(diffs), strict=True))
            test[endpoint]["sd"] = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        tests.append(test)
    for endpoint in ENDPOINTS:
        for test, adjusted in zip(tests, holm([t[endpoint]["p"] for t in tests]), strict=True):
            test[endpoint]["holm"] = adjusted
    return tests


def _cells(t: dict[str, Any]) -> str:
    """`diff [low, high] | p / Holm p | verdict` in percentage points."""
    if math.isnan(t["low"]):
        return f"{100 * t['mean']:+.1f}, interval n/a (1 seed) | n/a | n/a (1 seed)"
    interval = f"{100 * t['mean']:+.1f} [{100 * t['low']:+.1f}, {100 * t['high']:+.1f}]"
    return f"{interval} | {_p(t['p'])} / {_p(t['holm'])} | {verdict(t['mean'], t['holm'])}"


def _p(value: float) -> str:
    """A p-value to three decimals, "<0.001" below that."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def render_holm(root: Path) -> str:
    """Markdown: every comparison to GRPO of sections 1, 6, 7, 11 and 12, at both endpoints, with the paired t-test's
    p, the Holm-adjusted p within its family and endpoint, the verdict after Holm, and the smallest difference the
    design detects with 80% power on the family's primary endpoint."""
    lines = [
        "| family (primary endpoint) | method | seeds | final: minus GRPO [95%] | p / Holm p | verdict after Holm |"
        " 2nd half: minus GRPO [95%] | p / Holm p | verdict after Holm | detectable at 80% power (primary) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, folder, primary in FAMILIES:
        path = root / "benchmarks" / folder / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for t in family_tests(rows):
            detectable = detectable_effect(t[primary]["sd"], t["seeds"])
            smallest = "n/a" if math.isnan(detectable) else f"{100 * detectable:.1f}"
            lines.append(f"| {label}, {folder} ({primary}) | {t['method']} | {t['seeds']} | {_cells(t['final'])} | "
                         f"{_cells(t['2nd half'])} | {smallest} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_mcnemar(rows: list[dict[str, Any]]) -> str:
    """One line: each method's problems gained and lost from its first to its last evaluation (seed 0), the exact
    McNemar p and the Holm-adjusted p over the methods."""
    tests = []
    for method in dict.fromkeys(r["method"] for r in rows if r.get("kind") == "eval"):
        curve = {r["step"]: r["correct"] for r in rows if r.get("kind") == "eval" and r["method"] == method
                 and r.get("seed", 0) == 0}  # fmt: skip
        tests.append((method, min(curve), max(curve), *mcnemar_exact(curve[min(curve)], curve[max(curve)])))
    adjusted = holm([t[-1] for t in tests])
    parts = [f"{method} {gained} gained / {lost} lost, p = {p:.3f} (Holm {a:.3f})"
             for (method, _, _, gained, lost, p), a in zip(tests, adjusted, strict=True)]  # fmt: skip
    first, last = (tests[0][1], tests[0][2]) if tests else (0, 0)
    return (f"Problem by problem from step {first} to {last} (exact McNemar test, Holm's correction over the "
            f"{len(tests)} methods): " + "; ".join(parts) + ".")  # fmt: skip
