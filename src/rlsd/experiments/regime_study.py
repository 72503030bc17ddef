"""Issue 26's pre-registered study on the long chains (BENCHMARKS.md section 13): its primary endpoint, the verdicts
against GRPO with an equivalence margin (Holm across the family), the oracle gate, the seeds a design needs, and the
table `rlsd bench report` renders from `benchmarks/regime-long/`.

    python -m rlsd.experiments.regime_study power --sd 2.1      # seeds for the margin at a paired SD (points)
    python -m rlsd.experiments.regime_study table               # the table from benchmarks/regime-long/
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from rlsd.experiments.verdicts import holm, paired_test

ALPHA = 0.05
POWER = 0.8
MARGIN = 0.015
"""The equivalence margin: +-1.5 points of held-out greedy pass@1."""
WINDOW = (10, 100)
"""The primary endpoint's evaluations: steps 10, 20, ..., 100 (every evaluation after the start: the oracle and the
held-lam variant act on every step)."""
FAMILY = ("oracle", "rlsd", "rlsd-held-wide", "rlrt", "antisd", "sdar")
"""The comparisons to GRPO corrected together (Holm); the variant is `rlsd-held-wide-steps` instead when the worked
steps localise errors (section 13)."""
RENDERED = (*FAMILY[:3], "rlsd-held-wide-steps", *FAMILY[3:])
FOLDER = "regime-long"


def primary_endpoint(rows: list[dict[str, Any]], method: str, seed: int, window: tuple[int, int] = WINDOW) -> float:
    """Mean greedy pass@1 of one run over its evaluations at steps within `window` (inclusive)."""
    values = [r["pass_at_1"] for r in rows if r.get("kind") == "eval" and r.get("method") == method
              and r.get("seed") == seed and window[0] <= r["step"] <= window[1]]  # fmt: skip
    if not values:
        raise ValueError(f"no evaluation of {method} seed {seed} at steps {window[0]}-{window[1]}")
    return statistics.mean(values)


def tost_p(diffs: list[float], margin: float = MARGIN) -> float:
    """The two one-sided tests' p that the mean paired difference lies within +-margin (the larger of the two)."""
    from scipy import stats

    if len(diffs) < 2:
        return math.nan
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    df = len(diffs) - 1
    return float(max(stats.t.sf((mean + margin) / se, df), stats.t.cdf((mean - margin) / se, df)))


def verdicts(diffs_by_method: dict[str, list[float]], margin: float = MARGIN) -> dict[str, dict[str, Any]]:
    """Per method: the paired difference to GRPO with its 95% interval, the Holm-adjusted p of the difference test and
    of the equivalence test (each corrected across the family), and the verdict: "better" / "worse" (adjusted p of
    the difference < 5%), else "equivalent" (adjusted TOST p < 5%: within +-margin), else "inconclusive"."""
    names = list(diffs_by_method)
    tests = [paired_test(diffs_by_method[name]) for name in names]
    p_diff = holm([t[3] for t in tests])
    p_equiv = holm([tost_p(diffs_by_method[name], margin) for name in names])
    out = {}
    for name, (mean, low, high, _), pd, pe in zip(names, tests, p_diff, p_equiv, strict=True):
        if not math.isnan(pd) and pd < ALPHA:
            word = "better" if mean > 0 else "worse"
        elif not math.isnan(pe) and pe < ALPHA:
            word = "equivalent"
        else:
            word = "inconclusive"
        out[name] = {"diff": mean, "ci95": [low, high], "p_holm": pd, "p_equiv_holm": pe, "verdict": word,
                     "n": len(diffs_by_method[name])}  # fmt: skip
    return out


def oracle_gate(diffs: list[float], margin: float = MARGIN) -> bool:
    """The positive control passes when the lower bound of its paired difference's 95% interval exceeds +margin: only
    then can a teacher-based rule be expected to show anything in this regime."""
    _, low, _, _ = paired_test(diffs)
    return not math.isnan(low) and low > margin


def seeds_needed(sd: float, margin: float = MARGIN, family: int = len(FAMILY)) -> dict[str, int]:
    """Paired seeds for 80% power at a paired SD `sd` (pass@1 units), each test at ALPHA / family (Holm's first
    step): to detect a difference of `margin` (two-sided t-test), and to show equivalence within +-margin when the
    true difference is 0 (two one-sided tests, each at power 1 - beta / 2). statsmodels' `TTestPower`."""
    from statsmodels.stats.power import TTestPower

    effect, alpha = margin / sd, ALPHA / family
    detect = TTestPower().solve_power(effect_size=effect, alpha=alpha, power=POWER, alternative="two-sided")
    equiv = TTestPower().solve_power(effect_size=effect, alpha=alpha, power=1 - (1 - POWER) / 2, alternative="larger")
    return {"detect": math.ceil(detect), "equivalence": math.ceil(equiv)}


# ------------------------------------------------------------------------------------------------ the table
def render_regime_long(root: Path) -> str:
    """The study's table from `benchmarks/regime-long/metrics.jsonl`: per method, seeds, the primary endpoint, the
    paired difference to GRPO and the verdict; a line saying so while no run exists."""
    path = root / "benchmarks" / FOLDER / "metrics.jsonl"
    if not path.exists():
        return "No run of the study yet (`benchmarks/regime-long/` holds none).\n"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finished = {(r["method"], r["seed"]) for r in rows if r.get("kind") == "eval" and r["step"] >= WINDOW[1]}
    grpo = sorted(s for m, s in finished if m == "grpo")
    methods = [m for m in RENDERED if any(name == m for name, _ in finished)]  # corrected together: those run
    diffs = {m: [primary_endpoint(rows, m, s) - primary_endpoint(rows, "grpo", s) for s in grpo if (m, s) in finished]
             for m in methods}  # fmt: skip
    table = verdicts({m: d for m, d in diffs.items() if d})
    lines = ["| method | seeds | primary endpoint (pass@1 %) | minus GRPO [95% CI] | Holm p | equivalence Holm p | "
             "verdict |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ["grpo", *methods]:
        seeds = [s for m, s in finished if m == method]
        score = 100 * statistics.mean(primary_endpoint(rows, method, s) for s in seeds)
        if method == "grpo" or method not in table:
            lines.append(f"| {method} | {len(seeds)} | {score:.1f} | | | | |")
            continue
        t = table[method]
        ci = "n/a" if math.isnan(t["ci95"][0]) else f"[{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}]"
        lines.append(f"| {method} | {len(seeds)} | {score:.1f} | {100 * t['diff']:+.1f} {ci} | {_p(t['p_holm'])} | "
                     f"{_p(t['p_equiv_holm'])} | {t['verdict']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_regime_pilot(root: Path, folder: str = "regime-long-pilot") -> str:
    """Every run of the study's pilot (`benchmarks/FOLDER/`): greedy pass@1 at the start and the last evaluation, the
    mean training reward, the mean share of groups whose completions all got the same reward (TRL's
    `frac_reward_zero_std`: no advantage, nothing learned), the median seconds per optimizer step and the wall time."""
    path = root / "benchmarks" / folder
    if not (path / "results.json").exists():
        return f"No pilot run yet (`benchmarks/{folder}/` holds none).\n"
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    runs = json.loads((path / "results.json").read_text())["runs"]
    lines = ["| method | seed | steps | greedy pass@1 start -> last (%) | train reward (%) | groups with no advantage "
             "(%) | s / step | wall s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, summary in runs.items():
        method, seed = key.rsplit("/", 1)
        train = [r for r in rows if r.get("kind") == "train" and r.get("method") == method and r["seed"] == int(seed)]
        reward = 100 * statistics.mean(r["reward"] for r in train)
        zero = 100 * statistics.mean(r["frac_reward_zero_std"] for r in train)
        lines.append(f"| {method} | {seed} | {len(train)} | {100 * summary['initial_pass_at_1']:.1f} -> "
                     f"{100 * summary['final_pass_at_1']:.1f} | {reward:.2f} | {zero:.1f} | "
                     f"{summary['seconds_per_step']:.1f} | {summary['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlsd.experiments.regime_study")
    sub = parser.add_subparsers(dest="command", required=True)
    power = sub.add_parser("power", help="paired seeds for the margin at a paired SD")
    power.add_argument("--sd", type=float, required=True, help="paired SD of the primary endpoint, in points")
    power.add_argument("--margin", type=float, default=100 * MARGIN, help="equivalence margin, in points")
    power.add_argument("--family", type=int, default=len(FAMILY), help="comparisons corrected together")
    sub.add_parser("table", help="the study's table from benchmarks/regime-long/")
    args = parser.parse_args(argv)
    if args.command == "power":
        print(json.dumps(seeds_needed(args.sd / 100, args.margin / 100, args.family)))
    else:
        print(render_regime_long(Path(".")), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
