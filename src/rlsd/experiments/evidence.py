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
import random
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlsd.experiments.tables import render_cost_table, render_study_table

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
    """`m [lo, hi]` in percentage points."""
    mean, low, high = mean_interval(values)
    sign = "+" if signed else ""
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


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
    for n in [s for s in steps if s > 0 and 2 * s in steps and s % 20 == 0]:
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
            lines.append(
                f"| {name} | {step} | {len(chosen)} | {auc:.3f} [{low:.3f}, {high:.3f}] | "
                f"{statistics.mean(r['mean_delta_correct'] for r in chosen):+.3f} / "
                f"{statistics.mean(r['mean_delta_wrong'] for r in chosen):+.3f} | {first} | "
                f"{_pct(statistics.mean(r['clip_low_frac'] for r in chosen))} / "
                f"{_pct(statistics.mean(r['clip_high_frac'] for r in chosen))} |"
            )
    return "\n".join(lines) + "\n"


def render_training_clip(root: Path) -> str:
    """RLSD's clipped shares during training, over the steps where lam > 0 (one window for every number)."""
    rows, results = _methods_rows(root)
    decay = results["config"]["lambda_decay_steps"]
    lines = [
        "| window | clipped low | clipped high | clipped total | policy entropy RLSD / GRPO |",
        "|---|---|---|---|---|",
    ]
    for label, last in (("steps 1 to lam = 0", decay), ("all steps", results["config"]["steps"])):
        low = statistics.mean(_train_values(rows, "rlsd", "rlsd/clip_low_frac", last))
        high = statistics.mean(_train_values(rows, "rlsd", "rlsd/clip_high_frac", last))
        entropy = " / ".join(
            f"{statistics.mean(_train_values(rows, m, 'entropy', last)):.3f}" for m in ("rlsd", "grpo")
        )
        lines.append(f"| {label} | {_pct(low)} | {_pct(high)} | {_pct(low + high)} | {entropy} |")
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
    lines.append(
        f"`rlsd demo` took {summary['total_seconds']:.0f} s, {summary['warm_start_seconds']:.0f} s of it the warm "
        f"start (cold cache); `make demo` on a fresh clone, creating the virtual environment and installing "
        f"everything, took {timing['make_demo_seconds']:.0f} s in all ({timing['machine']})."
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


# ------------------------------------------------------------------------------------------------ the real model
_REAL_LEAK = re.compile(r"\breference\b|given answer|\bthe answer is given\b", re.IGNORECASE)
"""An OPSD-style leak on the real model: a completion that mentions a reference or a given answer."""


def _real(root: Path) -> Path:
    return root / "benchmarks" / "real"


def render_real_diagnostics(root: Path, file: str = "diagnostics.json") -> str:
    """SmolLM2-135M's self-teacher before training, per teacher template (`benchmarks/real/diagnostics.json`):
    AUC of the per-sequence mean Delta (correct above wrong) with its bootstrap interval, mean Delta, the share of
    tokens (of rows with A != 0) whose clipped RLSD weight differs from 1, and Delta by token position."""
    d = json.loads((_real(root) / file).read_text())
    templates = d["templates"]
    lines = [
        "| teacher template | AUC [95% CI] | mean Delta correct / wrong | mean abs Delta per token |"
        " weight != 1 | weight at a clip bound |",
        "|---|---|---|---|---|---|",
    ]

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    for name, t in templates.items():
        low, high = t["auc_ci95"]
        lines.append(
            f"| {name} | {num(t['auc'], '.3f')} [{num(low, '.3f')}, {num(high, '.3f')}] | "
            f"{num(t['delta_mean_correct'], '+.3f')} / {num(t['delta_mean_incorrect'], '+.3f')} | "
            f"{t['delta_token_abs_mean']:.3f} | {_pct(t['weight_differs_frac'])} | {_pct(t['weight_clipped_frac'])} |"
        )
    lines += ["", "| token positions | " + " | ".join(f"{n}: correct / wrong" for n in templates) + " |",
              "|---" * (1 + len(templates)) + "|"]  # fmt: skip
    for i, cell in enumerate(next(iter(templates.values()))["delta_by_position"]):
        row = [f"{num(t['delta_by_position'][i]['correct'], '+.3f')} / "
               f"{num(t['delta_by_position'][i]['incorrect'], '+.3f')}" for t in templates.values()]  # fmt: skip
        lines.append(f"| {cell['positions']} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"{d['problems']} training problems x G = {d['generations']} completions (T = 1, at most "
        f"{d['max_new_tokens']} tokens): {d['n_correct']} of {d['sequences']} correct "
        f"({_pct(d['accuracy'])}%), {d['groups_with_signal']} of {d['groups']} groups with reward variance; "
        f"generation {d['generate_s']:.0f} s, student + teacher scoring {d['score_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _real_eval(root: Path, name: str) -> tuple[dict[str, Any] | None, float | None]:
    """An eval summary of the real-model run and the leakage share of its completions (None when absent)."""
    path = _real(root) / f"eval-{name}.json"
    if not path.exists():
        return None, None
    completions_path = _real(root) / f"eval-{name}.completions.json"
    leak = None
    if completions_path.exists():
        completions = json.loads(completions_path.read_text())
        leak = sum(bool(_REAL_LEAK.search(c)) for c in completions) / max(1, len(completions))
    return json.loads(path.read_text()), leak


def render_real_runs(root: Path) -> str:
    """GRPO / RLSD / OPSD on SmolLM2-135M (`benchmarks/real/`): held-out pass@1 before and after, training
    reward, groups without signal, step time and the teacher pass's time, step by step, leakage. Held-out pass@1 is the
    mean over all n samples per problem (`avg@n`; `rlsd eval`'s `pass@1` counts the first sample only)."""
    base, base_leak = _real_eval(root, "base")
    lines = [
        "| method | steps | held-out pass@1 (avg@4) before -> after | train reward per step |"
        " frac_reward_zero_std per step | s per step | teacher s per step | leakage before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in ("grpo", "rlsd", "opsd"):
        path = _real(root) / "runs" / method / "log_history.json"
        history = json.loads(path.read_text()) if path.exists() else []
        steps = [h for h in history if "reward" in h]
        after, leak = _real_eval(root, method)
        if not steps:
            lines.append(f"| {method} | 0 | (did not run) | | | | | |")
            continue
        reward = " / ".join(_pct(h["reward"]) for h in steps)
        step_time = " / ".join(f"{h['step_time']:.0f}" for h in steps)
        teacher = " / ".join(f"{h['rlsd/teacher_time_s']:.2f}" for h in steps if "rlsd/teacher_time_s" in h) or "-"
        before = _pct(base["avg@n"]) if base else "n/a"
        lines.append(
            f"| {method} | {len(steps)} | {before} -> {_pct(after['avg@n']) if after else 'n/a'} | {reward} | "
            f"{' / '.join(_pct(h['frac_reward_zero_std'], 0) for h in steps)} | {step_time} | {teacher} | "
            f"{_pct(base_leak)} -> {_pct(leak)} |"
        )
    return "\n".join(lines) + "\n"


def render_real_contention(root: Path) -> str:
    """Seconds of one sampled generate call and one forward + backward of SmolLM2-135M by thread count, alone and
    beside one busy process (`benchmarks/real/contention.txt`, lines printed by `benchmarks/real/contention.py`)."""
    lines = ["| OMP threads | beside | generate 8 x 48 tokens (s) | forward + backward 8 x 80 tokens (s) |",
             "|---|---|---|---|"]  # fmt: skip
    pattern = re.compile(r"threads=(\d+) generate8x48=([\d.]+)s fwd\+bwd8x80=([\d.]+)s \['(\w+)'\]")
    for match in pattern.finditer((_real(root) / "contention.txt").read_text()):
        threads, generate, step, label = match.groups()
        beside = "nothing" if label == "quiet" else "one busy process"
        lines.append(f"| {threads} | {beside} | {float(generate):.2f} | {float(step):.2f} |")
    return "\n".join(lines) + "\n"


def paired_bootstrap(per_problem: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-problem differences and its 95% percentile bootstrap interval, resampling problems."""
    rng = random.Random(seed)
    n = len(per_problem)
    means = sorted(sum(per_problem[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(per_problem) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _per_problem(samples: list[dict[str, Any]]) -> dict[int, float]:
    """avg@n by problem: the mean reward of each problem's samples."""
    by_problem: dict[int, list[float]] = {}
    for sample in samples:
        by_problem.setdefault(sample["problem"], []).append(float(sample["reward"] > 0))
    return {problem: statistics.mean(values) for problem, values in sorted(by_problem.items())}


def render_real_round(root: Path, round_name: str = "round2") -> str:
    """A later real-model round (`benchmarks/real/<round>/`): per method, held-out avg@n before and after with the
    paired bootstrap interval of the change (problems resampled), the training reward's first and second half, the
    share of groups without reward variance, median step time, the teacher pass's median share of the steps where it
    ran (none once lam has decayed to 0, or with no reward variance), leakage, and the mean completion length with the
    share cut at the token limit (from `eval-*.json`); then RLSD and OPSD minus GRPO, paired by problem."""
    folder = _real(root) / round_name

    def samples(name: str) -> list[dict[str, Any]] | None:
        path = folder / f"eval-{name}.samples.json"
        return json.loads(path.read_text()) if path.exists() else None

    def leak(rows: list[dict[str, Any]]) -> str:
        return _pct(sum(bool(_REAL_LEAK.search(r["completion"])) for r in rows) / len(rows))

    def signed(values: tuple[float, float, float]) -> str:
        mean, low, high = (100 * v for v in values)
        return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"

    def length(name: str) -> str:
        path = folder / f"eval-{name}.json"
        if not path.exists():
            return "n/a"
        summary = json.loads(path.read_text())
        return f"{summary['mean_response_tokens']:.1f} ({_pct(summary['truncation_rate'])})"

    base = samples("base")
    if base is None:
        return "(round not run)\n"
    before = _per_problem(base)
    n = len(base) // len(before)
    lines = [
        f"| method | steps | held-out avg@{n} before -> after | after - before [95% CI] |"
        " train reward 1st / 2nd half | groups without variance | median s / step | teacher share of a step |"
        " leakage before -> after | tokens (truncated %) before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    after_by_method: dict[str, dict[int, float]] = {}
    for method in ("grpo", "rlsd", "opsd"):
        history_path = folder / "runs" / method / "log_history.json"
        rows = samples(method)
        history = [h for h in json.loads(history_path.read_text()) if "reward" in h] if history_path.exists() else []
        if rows is None or not history:
            lines.append(f"| {method} | {len(history)} | (did not finish) | | | | | | | |")
            continue
        after = after_by_method[method] = _per_problem(rows)
        change = signed(paired_bootstrap([after[p] - before[p] for p in before]))
        half = len(history) // 2
        reward = [h["reward"] for h in history]
        halves = f"{_pct(statistics.mean(reward[:half]))} / {_pct(statistics.mean(reward[half:]))}"
        teacher = [h["rlsd/teacher_time_s"] / h["step_time"] for h in history if h.get("rlsd/teacher_time_s", 0) > 0]
        lines.append(
            f"| {method} | {len(history)} | {_pct(statistics.mean(before.values()))} -> "
            f"{_pct(statistics.mean(after.values()))} | {change} | {halves} | "
            f"{_pct(statistics.mean(h['frac_reward_zero_std'] for h in history))} | "
            f"{statistics.median(h['step_time'] for h in history):.1f} | "
            f"{_pct(statistics.median(teacher)) if teacher else '-'} | {leak(base)} -> {leak(rows)} | "
            f"{length('base')} -> {length(method)} |"
        )
    if "grpo" in after_by_method:
        grpo = after_by_method["grpo"]
        for method in ("rlsd", "opsd"):
            if method in after_by_method:
                other = after_by_method[method]
                interval = signed(paired_bootstrap([other[p] - grpo[p] for p in grpo]))
                lines.append(f"\n{method} minus grpo after training, avg@{n}, paired by problem: {interval}")
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
