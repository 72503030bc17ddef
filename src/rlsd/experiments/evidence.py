"""`rlsd bench report`: every table of BENCHMARKS.md and the README's demo table, rendered from the committed raw
files under `benchmarks/`, so that no number in the documents is typed by hand.

A table lives in a document between `<!-- table:NAME -->` and `<!-- end -->`; `render_documents` replaces each
block with what `TABLES[NAME]` renders from the raw files, and with `check=True` only reports the blocks that
differ (the test suite runs it that way). Statistics: paired differences over seeds with a two-sided 95%
Student-t interval.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlsd.experiments.evidence_citation import render_generated_citation
from rlsd.experiments.evidence_demos import (
    render_agent_demo,
    render_agent_demo_idle,
    render_gui_demo,
    render_gui_pilots,
    render_video_demo,
    render_video_pilots,
    render_vision_srpo,
)
from rlsd.experiments.evidence_engines import render_served_teacher
from rlsd.experiments.evidence_real import (
    render_real_contention,
    render_real_diagnostics,
    render_real_round,
    render_real_runs,
)
from rlsd.experiments.evidence_verdict import render_credit_verdict
from rlsd.experiments.localisation import render_localisation
from rlsd.experiments.provenance import NOT_RECORDED, describe, render_provenance
from rlsd.experiments.regime_study import render_regime_long, render_regime_pilot
from rlsd.experiments.tables import render_cost_table, render_study_table
from rlsd.experiments.verdicts import render_holm, render_mcnemar

DOCUMENTS = ("README.md", "BENCHMARKS.md")
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end -->)", re.DOTALL)


# ------------------------------------------------------------------------------------------------ statistics
def t_975(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom (scipy's, for any number of seeds)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% t interval (the interval collapses to the mean for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(rows: list[dict[str, Any]], method: str, seed: int, key: str = "pass_at_1") -> dict[int, float]:
    """step -> `key` of one run's greedy evaluations."""
    return {
        r["step"]: r[key] for r in rows if r.get("kind") == "eval" and r.get("method") == method and r["seed"] == seed
    }


def seeds_of(rows: list[dict[str, Any]], method: str) -> list[int]:
    return sorted({r["seed"] for r in rows if r.get("method") == method and r.get("kind") == "eval"})


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _interval(values: list[float], signed: bool = False) -> str:
    """`m [lo, hi]` in percentage points (`m [n/a (1 seed)]`: one value has no interval)."""
    mean, low, high = mean_interval(values)
    sign = "+" if signed else ""
    if len(values) < 2:
        return f"{100 * mean:{sign}.1f} [{ONE_SEED}]"
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


ONE_SEED = "n/a (1 seed)"


# ------------------------------------------------------------------------------------------------ the pilot
def render_pilot(root: Path) -> str:
    """Every pilot run: its warm start and greedy pass@1 on the pilot set at each evaluation, and the rule."""
    lines = [
        "| pilot | method | pass@1 at steps 0 / 25 / 50 / 75 / 100 / 125 / 150 | 2nd half minus warm start | rule |",
        "|---|---|---|---|---|",
    ]
    for folder in sorted((root / "benchmarks" / "pilot").glob("p*/")):
        rows = read_rows(folder / "metrics.jsonl")
        for method in dict.fromkeys(r["method"] for r in rows if r.get("kind") == "eval"):
            curve = eval_curve(rows, method, 0)
            if max(curve) < 150:
                lines.append(f"| {folder.name} | {method} | unfinished | n/a | n/a |")
                continue
            gain = statistics.mean(v for s, v in curve.items() if s >= 75) - curve[0]
            verdict = ("qualifies" if gain >= 0.05 else "fails") if method == "grpo" else "check"
            points = " / ".join(_pct(curve[s]) for s in sorted(curve))
            lines.append(f"| {folder.name} | {method} | {points} | {100 * gain:+.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ methods
def _methods_rows(root: Path, name: str = "methods") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = root / "benchmarks" / name
    return read_rows(folder / "metrics.jsonl"), json.loads((folder / "results.json").read_text())


def _final_and_start(rows: list[dict[str, Any]], method: str, seed: int) -> tuple[float, float]:
    curve = eval_curve(rows, method, seed)
    return curve[max(curve)], curve[0]


def _second_half(rows: list[dict[str, Any]], method: str, seed: int) -> float:
    curve = eval_curve(rows, method, seed)
    last = max(curve)
    return statistics.mean(v for s, v in curve.items() if s >= last / 2)


def _sampled(rows: list[dict[str, Any]], method: str, seed: int, step: int, key: str) -> float | None:
    found = [r[key] for r in rows if r.get("kind") == "sampled" and r["method"] == method and r["seed"] == seed
             and r["step"] == step]  # fmt: skip
    return found[0] if found else None


def render_methods(root: Path, name: str = "methods") -> str:
    """Final greedy pass@1 with its interval, paired differences to the warm start and to GRPO, the second-half
    mean, sampled pass@1 and pass@8 at the start and end, leakage and length (`name`: the folder under benchmarks)."""
    rows, results = _methods_rows(root, name)
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("kind") == "eval"))
    steps = results["config"]["steps"]
    lines = [
        "| method | seeds | final pass@1 | minus warm start (paired) | minus GRPO (paired) | 2nd-half mean |"
        " sampled pass@1 start -> end | pass@8 start -> end | final leakage | length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    grpo_seeds = set(seeds_of(rows, "grpo"))
    for method in methods:
        seeds = seeds_of(rows, method)
        finals = [_final_and_start(rows, method, s) for s in seeds]
        vs_grpo = "baseline" if method == "grpo" else "n/a"
        paired = [s for s in seeds if s in grpo_seeds]
        if method != "grpo" and len(paired) > 1:
            vs_grpo = _interval([_final_and_start(rows, method, s)[0] - _final_and_start(rows, "grpo", s)[0]
                                 for s in paired], signed=True)  # fmt: skip
        sampled = []
        for key in ("sampled_pass_at_1", "sampled_pass_at_k"):
            start = [_sampled(rows, method, s, 0, key) for s in seeds]
            end = [_sampled(rows, method, s, steps, key) for s in seeds]
            if None in start or None in end:
                sampled.append("n/a")
            else:
                sampled.append(f"{_pct(statistics.mean(start))} -> {_pct(statistics.mean(end))}")
        leakage = statistics.mean(eval_curve(rows, method, s, "leakage_rate")[steps] for s in seeds)
        length = statistics.mean(eval_curve(rows, method, s, "mean_length")[steps] for s in seeds)
        lines.append(
            f"| {method} | {len(seeds)} | {_interval([f for f, _ in finals])} | "
            f"{_interval([f - w for f, w in finals], signed=True)} | {vs_grpo} | "
            f"{_pct(statistics.mean(_second_half(rows, method, s) for s in seeds))} | {sampled[0]} | {sampled[1]} | "
            f"{_pct(leakage)} | {length:.1f} |"
        )
    return "\n".join(lines) + "\n"


def render_efficiency(root: Path) -> str:
    """Sample efficiency (claim b): steps for the seed-mean curve to reach warm start + k points, and RLSD at N
    steps against GRPO at 2N steps and at the step with the same wall time (compute-matched), paired over seeds."""
    rows, results = _methods_rows(root)
    seeds = [s for s in seeds_of(rows, "rlsd") if s in seeds_of(rows, "grpo")]
    lines = ["| comparison | RLSD | GRPO | RLSD minus GRPO (paired, 95%) |", "|---|---|---|---|"]
    ratio = statistics.median(
        results["runs"][f"rlsd/{s}"]["seconds_per_step"] / results["runs"][f"grpo/{s}"]["seconds_per_step"]
        for s in seeds
    )
    curves = {m: [eval_curve(rows, m, s) for s in seeds] for m in ("rlsd", "grpo")}
    steps = sorted(curves["grpo"][0])
    for n in [s for s in steps if s > 0 and 2 * s in steps]:
        same_time = min(steps, key=lambda s, n=n: abs(s - n * ratio))
        pairs = ((2 * n, f"step {n} vs {2 * n}"), (same_time, f"step {n} vs {same_time} (same wall time)"))
        for target, name in pairs:
            r = [c[n] for c in curves["rlsd"]]
            g = [c[target] for c in curves["grpo"]]
            lines.append(f"| {name} | {_pct(statistics.mean(r))} | {_pct(statistics.mean(g))} | "
                         f"{_interval([a - b for a, b in zip(r, g, strict=True)], signed=True)} |")  # fmt: skip
    warm = statistics.mean(c[0] for c in curves["grpo"])
    reach = []
    for points in (2, 4, 6, 8, 10):
        cells = []
        for method in ("rlsd", "grpo"):
            mean_curve = {s: statistics.mean(c[s] for c in curves[method]) for s in steps}
            hit = next((s for s in steps if mean_curve[s] >= warm + points / 100), None)
            cells.append("never" if hit is None else f"step {hit}")
        reach.append(f"| warm start + {points} points reached at | {cells[0]} | {cells[1]} | |")
    lines += reach
    lines.append(f"| median RLSD / GRPO seconds per step | {ratio:.3f} | 1.000 | |")
    return "\n".join(lines) + "\n"


def render_diagnostics(root: Path) -> str:
    """The self-teacher at the start and end of each method's runs: AUC of the per-sequence mean Delta (correct
    above wrong), mean Delta at the first reasoning tokens and over the rest, clipped shares."""
    rows, _ = _methods_rows(root)
    diag = [r for r in rows if r.get("kind") == "diagnostics"]
    lines = [
        "| run | step | seeds | AUC (mean Delta: correct vs wrong) | mean Delta correct / wrong |"
        " Delta at tokens 1, 2, 3 | clipped low / high |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in diag):
        for step in sorted({r["step"] for r in diag if r["method"] == method}):
            if step == 0 and method != "grpo":
                continue  # the warm start is the same for every method: shown once
            chosen = [r for r in diag if r["method"] == method and r["step"] == step and r["auc"] is not None]
            if not chosen:
                continue
            name = "warm start" if step == 0 else method
            first = " / ".join(f"{statistics.mean(r['delta_by_position'][i] for r in chosen):+.3f}" for i in (1, 2, 3))
            auc, low, high = mean_interval([r["auc"] for r in chosen])
            bounds = f"{low:.3f}, {high:.3f}" if len(chosen) > 1 else ONE_SEED
            lines.append(
                f"| {name} | {step} | {len(chosen)} | {auc:.3f} [{bounds}] | "
                f"{statistics.mean(r['mean_delta_correct'] for r in chosen):+.3f} / "
                f"{statistics.mean(r['mean_delta_wrong'] for r in chosen):+.3f} | {first} | "
                f"{_pct(statistics.mean(r['clip_low_frac'] for r in chosen))} / "
                f"{_pct(statistics.mean(r['clip_high_frac'] for r in chosen))} |"
            )
    return "\n".join(lines) + "\n"


def render_training_clip(root: Path) -> str:
    """RLSD's clipped shares during training, over the steps where lam > 0 (one window for every number; the clip
    shares are logged only while lam > 0, so the whole run's row has its entropy alone), and the most the token-1 hint
    artifact can add to the clipped-high share: one token of a mean-length training completion."""
    rows, results = _methods_rows(root)
    decay, steps = results["config"]["lambda_decay_steps"], results["config"]["steps"]
    lines = [
        "| window | clipped low | clipped high | clipped total | policy entropy RLSD / GRPO |",
        "|---|---|---|---|---|",
    ]
    logged = max(r["step"] for r in rows if r.get("kind") == "train" and r.get("rlsd/clip_high_frac") is not None)
    for label, last in ((f"steps 1-{decay} (lam > 0)", decay), (f"steps 1-{steps}", steps)):
        low = statistics.mean(_train_values(rows, "rlsd", "rlsd/clip_low_frac", last))
        high = statistics.mean(_train_values(rows, "rlsd", "rlsd/clip_high_frac", last))
        entropy = " / ".join(
            f"{statistics.mean(_train_values(rows, m, 'entropy', last)):.3f}" for m in ("rlsd", "grpo")
        )
        clip = f"{_pct(low)} | {_pct(high)} | {_pct(low + high)}"
        if last > decay and logged <= decay:
            clip = " | ".join([f"not logged after step {logged}"] * 3)
        lines.append(f"| {label} | {clip} | {entropy} |")
    length = statistics.mean(_train_values(rows, "rlsd", "completions/mean_length", decay))
    lines += [
        "",
        f"Token 1 is one of {length:.1f} tokens of a training completion (RLSD, mean over steps 1-{decay}): "
        f"the hint artifact, which clips it high on wrong completions, adds at most {100 / length:.1f} points "
        f"to the clipped-high share if every reweighted completion is wrong, {50 / length:.1f} if half are.",
    ]
    return "\n".join(lines) + "\n"


def _train_values(rows: list[dict[str, Any]], method: str, key: str, last_step: int) -> list[float]:
    """`key` of every logged training step 1..`last_step` of every seed of `method`."""
    return [r[key] for r in rows if r.get("kind") == "train" and r["method"] == method
            and r["step"] <= last_step and r.get(key) is not None]  # fmt: skip


def render_claims(root: Path) -> str:
    """The measurements behind claims (a) and (c): each OPSD variant's seed-mean peak, final and leakage next to
    GRPO at the same learning rate, and RLSD's policy entropy minus GRPO's, paired over seeds, in two windows."""
    rows, results = _methods_rows(root)
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("kind") == "eval"))
    lines = ["| measurement | value |", "|---|---|"]
    for method in [m for m in methods if "opsd" in m or m.startswith("grpo")]:
        seeds = seeds_of(rows, method)
        curves = [eval_curve(rows, method, s) for s in seeds]
        leaks = [eval_curve(rows, method, s, "leakage_rate") for s in seeds]
        mean = {step: statistics.mean(c[step] for c in curves) for step in sorted(curves[0])}
        leak = {step: statistics.mean(c[step] for c in leaks) for step in sorted(leaks[0])}
        peak = max(mean, key=mean.get)
        first_leak = next((step for step, value in leak.items() if value >= 0.05), None)
        lines.append(
            f"| {method}: pass@1 start / peak (step) / final; leakage final / max; first step with >= 5% leakage | "
            f"{_pct(mean[0])} / {_pct(mean[peak])} ({peak}) / {_pct(mean[max(mean)])}; {_pct(leak[max(leak)])} / "
            f"{_pct(max(leak.values()))}; {'never' if first_leak is None else f'step {first_leak}'} |"
        )
    seeds = [s for s in seeds_of(rows, "rlsd") if s in seeds_of(rows, "grpo")]
    decay, steps = results["config"]["lambda_decay_steps"], results["config"]["steps"]
    for label, last in ((f"steps 1-{decay} (lam > 0)", decay), (f"steps 1-{steps}", steps)):
        diffs = [
            statistics.mean(_train_values(_one_seed(rows, s), "rlsd", "entropy", last))
            - statistics.mean(_train_values(_one_seed(rows, s), "grpo", "entropy", last))
            for s in seeds
        ]
        mean, low, high = mean_interval(diffs)
        lines.append(
            f"| policy entropy, RLSD minus GRPO (paired, nats), {label} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |"
        )
    return "\n".join(lines) + "\n"


def _one_seed(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("seed") == seed]


# ------------------------------------------------------------------------------------------------ the rest
def render_cost(root: Path, folder: str = "cost") -> str:
    return render_cost_table(json.loads((root / "benchmarks" / folder / "cost.json").read_text()))


def render_study(root: Path) -> str:
    return render_study_table(json.loads((root / "benchmarks" / "study" / "results.json").read_text())["study"])


def _demo_rows(summary: dict[str, Any]) -> list[str]:
    """The per-method table of a demo summary (text or vision)."""
    lines = [
        "| method | warm start | final pass@1 | peak (step) | final leakage | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary["methods"].items():
        lines.append(f"| {method} | {_pct(s['initial_pass_at_1'])} | {_pct(s['final_pass_at_1'])} | "
                     f"{_pct(s['peak_pass_at_1'])} ({s['peak_step']}) | {_pct(s['final_leakage_rate'])} | "
                     f"{s['seconds_per_step']:.2f} |")  # fmt: skip
    return lines


def render_demo(root: Path) -> str:
    """The README's demo table from the committed summary of one `make demo` run."""
    summary = json.loads((root / "benchmarks" / "demo" / "summary.json").read_text())
    lines = [*_demo_rows(summary), ""]
    timing = json.loads((root / "benchmarks" / "demo" / "timing.json").read_text())
    made = describe(timing.get("provenance"))
    if "provenance" in timing:  # written by the run
        total = timing.get("enclosing_wall_seconds")
        make = "not recorded" if total is None else f"{total:.0f} s in all"
        where = f"commit {made['commit']}, {made['cpu']}, {made['threads']} torch threads; written by the run"
    else:  # the hand-written record of an older run
        make = f"{timing['make_demo_seconds']:.0f} s in all"
        where = f"{timing['machine']}; typed by hand, not written by the run: CPU and threads {NOT_RECORDED}"
    lines.append(
        f"`rlsd demo` took {summary['total_seconds']:.0f} s, {summary['warm_start_seconds']:.0f} s of it the warm "
        f"start (cold cache); `make demo` on a fresh clone, creating the virtual environment and installing "
        f"everything, took {make} ({where})."
    )
    return "\n".join(lines) + "\n"


def render_vision_demo(root: Path) -> str:
    """The README's vision demo table from the committed summary of one `rlsd demo --task vision` run."""
    summary = json.loads((root / "benchmarks" / "vision-demo" / "summary.json").read_text())
    lines = [*_demo_rows(summary), ""]
    lines.append(
        f"`rlsd demo --task vision` took {summary['total_seconds']:.0f} s, {summary['warm_start_seconds']:.0f} s of "
        f"it the warm start (cold cache), {summary['config']['eval_size']} held-out problems."
    )
    lines += ["", render_mcnemar(read_rows(root / "benchmarks" / "vision-demo" / "metrics.jsonl"))]
    return "\n".join(lines) + "\n"


def render_teachers(root: Path) -> str:
    """The external-teacher comparison (`benchmarks/teachers/`): the methods table, the frozen teacher's own greedy
    pass@1 on the same held-out problems, and each method's median seconds per step with its ratio to GRPO's."""
    rows, results = _methods_rows(root, "teachers")
    lines = [render_methods(root, "teachers").rstrip("\n"), ""]
    teacher = [r for r in rows if r.get("kind") == "teacher_eval"]
    if teacher:
        lines += [f"The external teacher alone (greedy, same {results['config']['eval_size']} held-out problems): "
                  f"pass@1 {_pct(teacher[-1]['pass_at_1'])}.", ""]  # fmt: skip
    train = [r for r in rows if r.get("kind") == "train"]
    brts = [r for r in train if r.get("method") == "brts" and "rlsd/teacher_rollout_correct" in r]
    if brts:

        def mean_of(key: str) -> float:
            return statistics.mean(r[f"rlsd/teacher_rollout_{key}"] for r in brts)

        lines += [f"BRTS over training (mean of {len(brts)} logged steps): a correct teacher trajectory kept for "
                  f"{_pct(mean_of('correct'))}% of prompts, the answer retry needed for {_pct(mean_of('retry'))}%, "
                  f"mean top-16 alignment {mean_of('alignment'):.3f}.", ""]  # fmt: skip
    margins = [r["rlsd/pbsd_margin"] for r in train if r.get("method") == "pbsd" and "rlsd/pbsd_margin" in r]
    if margins:
        lines += [f"PBSD's beta-scaled margin over training ({len(margins)} logged steps): mean "
                  f"{statistics.mean(margins):+.2f}, largest {max(margins):+.2f}.", ""]  # fmt: skip
    per_step: dict[str, list[float]] = {method: [] for method in results["table"]}
    for key, run in results["runs"].items():
        per_step[key.rsplit("/", 1)[0]].append(run["seconds_per_step"])
    grpo = statistics.median(per_step["grpo"]) if "grpo" in per_step else None
    lines += ["| method | median s / step | ratio to GRPO |", "|---|---|---|"]
    for method, values in per_step.items():
        median = statistics.median(values)
        ratio = f"{median / grpo:.2f}x" if grpo else "n/a"
        lines.append(f"| {method} | {median:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[Path], str]] = {
    "pilot": render_pilot,
    "methods": render_methods,
    "efficiency": render_efficiency,
    "diagnostics": render_diagnostics,
    "training-clip": render_training_clip,
    "claims": render_claims,
    "cost": render_cost,
    "study": render_study,
    "family": lambda root: render_methods(root, "family"),
    "family-cost": lambda root: render_cost(root, "family-cost"),
    "generated": lambda root: render_methods(root, "generated"),
    "generated-cost": lambda root: render_cost(root, "generated-cost"),
    "generated-citation": render_generated_citation,
    "cost-before-skip": lambda root: render_cost(root, "cost-before-skip"),
    "cost-trainer-v2": lambda root: render_cost(root, "cost-trainer-v2"),
    "demo": render_demo,
    "vision-demo": render_vision_demo,
    "teachers": render_teachers,
    "teachers-cost": lambda root: render_cost(root, "teachers-cost"),
    "real-diagnostics": render_real_diagnostics,
    "real-runs": render_real_runs,
    "real-contention": render_real_contention,
    "real-diagnostics-round2": lambda root: render_real_diagnostics(root, "round2/diagnostics.json"),
    "real-round2": render_real_round,
    "holm": render_holm,
    "provenance": render_provenance,
    "localisation-long": render_localisation,
    "regime-long": render_regime_long,
    "regime-long-pilot": render_regime_pilot,
    "agent-demo": render_agent_demo,
    "agent-demo-idle": render_agent_demo_idle,
    "vision-srpo": render_vision_srpo,
    "gui-pilots": render_gui_pilots,
    "gui-demo": render_gui_demo,
    "video-pilots": render_video_pilots,
    "video-demo": render_video_demo,
    "served-teacher": render_served_teacher,
    "credit-verdict": render_credit_verdict,
}
"""Every rendered table by name, as named in the documents' `<!-- table:NAME -->` markers."""


def render_documents(root: Path, check: bool = False) -> list[str]:
    """Re-render every marked table of README.md and BENCHMARKS.md from the raw files; returns `FILE:NAME` of each
    block that differed (with `check`, nothing is written)."""
    differing: list[str] = []
    for document in DOCUMENTS:
        path = root / document
        text = path.read_text()

        def replace(match: re.Match[str], document: str = document) -> str:
            name = match["name"]
            if name not in TABLES:
                raise ValueError(f"{document}: unknown table '{name}'; known: {', '.join(TABLES)}")
            body = TABLES[name](root)
            if body != match["body"]:
                differing.append(f"{document}:{name}")
            return match[1] + body + match[4]

        rendered = _BLOCK.sub(replace, text)
        if not check and rendered != text:
            path.write_text(rendered)
    return differing
