"""The real-model tables of BENCHMARKS.md section 10 (SmolLM2-135M, `benchmarks/real/`), rendered by `rlsd bench
report` (`rlsd.experiments.evidence.TABLES`) from the committed raw files."""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path
from typing import Any

from rlsd.experiments.tables import pct as _pct

TEACHER_RAN_S = 1e-3
"""A step's teacher pass "ran" above this many seconds: a skipped pass (no row with A != 0) logs only its
bookkeeping, tens of microseconds, and would pull the median share of the steps where it ran towards 0."""

# ------------------------------------------------------------------------------------------------ the real model
_REAL_LEAK = re.compile(r"\breference\b|given answer", re.IGNORECASE)
"""An OPSD-style leak on the real model, as the protocol defines it (BENCHMARKS.md section 10): a completion that
mentions a "reference" or a "given answer" (an earlier pattern also matched "the answer is given", broader than
that)."""


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
        f"generation {d['generate_s']:.0f} s, student + teacher scoring {d['score_s']:.0f} s, "
        f"{d['wall_s']:.1f} s wall in all (the script's own clock).",
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
    ran (over `TEACHER_RAN_S`: none once lam has decayed to 0, or with no reward variance), leakage, and the mean
    completion length with the share cut at the token limit (from `eval-*.json`); then RLSD and OPSD minus GRPO, paired
    by problem."""
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
        teacher = [h["rlsd/teacher_time_s"] / h["step_time"] for h in history
                   if h.get("rlsd/teacher_time_s", 0) > TEACHER_RAN_S]  # fmt: skip
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
