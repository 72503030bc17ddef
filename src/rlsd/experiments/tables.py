"""The Markdown tables of the benchmark harness's own results (`rlsd bench cost`, `rlsd bench study`), written by the
bench beside its raw files and rendered again into BENCHMARKS.md by `rlsd.experiments.evidence`."""

from __future__ import annotations

import math
from typing import Any

TEACHER_SHARE_FLOOR = 0.02
"""Below this share of a step, a teacher pass is a skipped one (RLSD once lam is 0) or not the cost (BRTS and PBSD
generate in "rest"): "extra / teacher" is then a ratio to almost nothing, shown as n/a."""


def pct(value: float | None, digits: int = 1) -> str:
    """A share in percent, "n/a" for None."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def extra_over_teacher(row: dict[str, Any]) -> str:
    """(step - GRPO step) / teacher pass, "n/a" without a ratio or when the teacher pass is under the floor."""
    value = row.get("extra_over_teacher")
    if value is None or row["teacher_s_median"] < TEACHER_SHARE_FLOOR * row["step_s_median"]:
        return "n/a"
    return f"{value:.2f}"


def render_cost_table(cost: dict[str, Any]) -> str:
    """Markdown: medians and ratios to GRPO (of `rlsd bench cost`'s result; the bench writes it to `table.md`); a
    "context s" column (the generated context's writer, part of "teacher s") when the result records one; "extra /
    teacher" is n/a where the teacher pass is under `TEACHER_SHARE_FLOOR` of the step."""
    context = any("context_s_median" in r for r in cost["results"].values())
    lines = [
        "| config | s / step | ratio to GRPO | generation s | teacher s |"
        + (" context s |" if context else "")
        + " rest s | extra / teacher | peak RSS MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if context else ""),
    ]
    for name, r in cost["results"].items():
        extra = extra_over_teacher(r)
        written = f" {r.get('context_s_median', 0.0):.3f} |" if context else ""
        lines.append(
            f"| {name} | {r['step_s_median']:.3f} | {r.get('step_ratio_to_grpo', math.nan):.3f} | "
            f"{r['generation_s_median']:.3f} | {r['teacher_s_median']:.3f} |{written} {r['rest_s_median']:.3f} | "
            f"{extra} | {r['peak_rss_mib']:.0f} | {r.get('memory_ratio_to_grpo', math.nan):.3f} |"
        )
    return "\n".join(lines) + "\n"


def render_study_table(table: dict[str, Any]) -> str:
    """Markdown: each knob's score, its paired difference to GRPO with the 95% interval, and the verdict (no interval
    and no verdict from one seed)."""
    lines = [
        "| config | pass@1, 2nd half (mean) | minus GRPO (paired) | 95% interval | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, t in table.items():
        low, high = t["diff_ci95"]
        verdict = "baseline" if name == "grpo" else ("helps" if low > 0 else "hurts" if high < 0 else "within noise")
        interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
        if math.isnan(low) or math.isnan(high):
            interval, verdict = "n/a (1 seed)", "baseline" if name == "grpo" else "n/a (1 seed)"
        score, diff = f"{100 * t['score_mean']:.1f}", f"{100 * t['diff_mean']:+.1f}"
        lines.append(f"| {name} | {score} | {diff} | {interval} | {verdict} |")
    return "\n".join(lines) + "\n"
