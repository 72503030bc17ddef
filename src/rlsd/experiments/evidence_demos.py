"""BENCHMARKS.md's tables of one-seed demo runs of the newer tasks and methods (`rlsd demo --task agent`, `rlsd demo
--task vision --methods grpo,srpo`), rendered from the committed `summary.json`, `metrics.jsonl` and `timing.json` of
each run by `rlsd bench report` (registered in `rlsd.experiments.evidence.TABLES`).

Each table: warm start, final and best pass@1 per method, the tool-call rate at the end where the task logs one, and
two paired exact McNemar tests on the per-problem outcomes of the same held-out problems: the final evaluation against
the warm start, and against GRPO's final evaluation (Holm's correction over the methods compared to GRPO).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlsd.experiments.provenance import describe
from rlsd.experiments.tables import pct
from rlsd.experiments.verdicts import ALPHA, holm, mcnemar_exact

EVALUATION = {
    "agent": "sampled pass@1 (T = 1, one seeded episode per problem, through the tool loop)",
    "vision": "greedy pass@1",
    "gui": "greedy click accuracy (the click inside the target's box)",
    "video": "greedy pass@1",
}
"""How each task's demo evaluates (`evaluate_agent`, `evaluate_vision`): what the table's pass@1 is."""


def _read(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The run's summary, its metrics rows and its timing record."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rows, json.loads((folder / "timing.json").read_text())


def _outcomes(rows: list[dict[str, Any]], method: str) -> dict[int, str]:
    """step -> the 0/1 per-problem outcome string of `method`'s evaluations (seed 0)."""
    return {r["step"]: r["correct"] for r in rows if r.get("kind") == "eval" and r.get("method") == method
            and r.get("seed", 0) == 0}  # fmt: skip


def _p(value: float) -> str:
    """A p-value to three decimals, "<0.001" below that."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _step_times(rows: list[dict[str, Any]], method: str, median: float) -> str:
    """`median (min-max)` of the logged training step times: the spread shows how much the machine's load moved."""
    times = [r["step_time"] for r in rows if r.get("kind") == "train" and r.get("method") == method
             and r.get("step_time") is not None]  # fmt: skip
    return f"{median:.2f} ({min(times):.2f}-{max(times):.2f})" if times else f"{median:.2f}"


def _vs_grpo(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, tuple[int, int, float, float]]:
    """method -> (problems only it solved, problems only GRPO solved, exact McNemar p, Holm p over the methods) at
    both runs' final evaluations."""
    grpo = _outcomes(rows, "grpo")
    others = [m for m in methods if m != "grpo"]
    tests = []
    for method in others:
        mine = _outcomes(rows, method)
        tests.append(mcnemar_exact(grpo[max(grpo)], mine[max(mine)]))
    adjusted = holm([p for _, _, p in tests])
    return {m: (*t, a) for m, t, a in zip(others, tests, adjusted, strict=True)}


def render_demo_run(root: Path, folder: str, target_seconds: float | None = None) -> str:
    """Markdown: one demo run (`benchmarks/<folder>/`) per method, with the McNemar tests, what was evaluated, where
    and how long it ran, the verdict against GRPO, and whether it met `target_seconds` when one is given."""
    summary, rows, timing = _read(root / "benchmarks" / folder)
    methods = list(summary["methods"])
    if "grpo" not in methods:
        raise ValueError(f"benchmarks/{folder}/summary.json: no 'grpo' row to compare the methods with")
    if summary["task"] not in EVALUATION:
        raise ValueError(f"benchmarks/{folder}/summary.json: unknown task '{summary['task']}'")
    tools = all("final_tool_call_rate" in s for s in summary["methods"].values())
    header = ["method", "warm start", "final", "best (step)"] + (["tool calls at the end"] if tools else [])
    header += ["final vs warm start: gained / lost, McNemar p", "final vs GRPO's: better / worse, p (Holm)",
               "median s / step (min-max)", "training s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    vs_grpo = _vs_grpo(rows, methods)
    for method, s in summary["methods"].items():
        curve = _outcomes(rows, method)
        gained, lost, p = mcnemar_exact(curve[min(curve)], curve[max(curve)])
        cells = [method, pct(s["initial_pass_at_1"]), pct(s["final_pass_at_1"]),
                 f"{pct(s['peak_pass_at_1'])} ({s['peak_step']})"]  # fmt: skip
        cells += [pct(s["final_tool_call_rate"])] if tools else []
        cells.append(f"{gained} / {lost}, p = {_p(p)}")
        if method == "grpo":
            cells.append("baseline")
        else:
            better, worse, p_grpo, p_holm = vs_grpo[method]
            cells.append(f"{better} / {worse}, p = {_p(p_grpo)} ({_p(p_holm)})")
        cells += [_step_times(rows, method, s["seconds_per_step"]), f"{s['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    made = describe(summary.get("provenance"))
    config = summary["config"]
    total = summary["total_seconds"]
    lines += [
        "",
        f"One seed ({config['seed']}), {config['steps']} steps of {config['prompts_per_step']} prompts x "
        f"{config['num_generations']} completions per method, {EVALUATION[summary['task']]} in percent on "
        f"{config['eval_size']} held-out problems every {config['eval_every']} steps. Run as "
        f"{made['command']} at commit {made['commit']}, torch threads {made['threads']}, "
        f"{summary['provenance'].get('cpu_count', 'n/a')} cores ({made['cpu']}): {total:.0f} s in all, "
        f"{summary['warm_start_seconds']:.0f} s of it the warm start ({timing['wall_seconds']:.0f} s by its "
        f"`timing.json`).",
    ]
    if target_seconds is not None:
        met = "within" if total <= target_seconds else "over"
        lines[-1] += f" That is {met} the issue's target of {target_seconds:.0f} s for the full demo."
    distinct = [m for m, (_, _, _, p_holm) in vs_grpo.items() if p_holm < ALPHA]
    verdict = (
        "no method's final outcomes are distinguishable from GRPO's (every Holm p >= 0.05)"
        if not distinct
        else f"distinguishable from GRPO after Holm: {', '.join(distinct)}"
    )
    over = f"{len(vs_grpo)} method{'s' if len(vs_grpo) != 1 else ''}"
    lines += ["", f"Against GRPO at the end (exact McNemar test, Holm over {over}): {verdict}."]
    return "\n".join(lines) + "\n"


def render_agent_demo(root: Path) -> str:
    """The agent task's demo run (`benchmarks/agent-demo/`), against issue 24's 10-minute target."""
    return render_demo_run(root, "agent-demo", target_seconds=600.0)


def render_agent_demo_idle(root: Path) -> str:
    """The agent demo rerun on the idle machine with a cold cache (`benchmarks/agent-demo-idle/`), for its time."""
    return render_demo_run(root, "agent-demo-idle", target_seconds=600.0)


def render_vision_srpo(root: Path) -> str:
    """GRPO against SRPO on the vision task (`benchmarks/vision-srpo/`)."""
    return render_demo_run(root, "vision-srpo")


def render_gui_demo(root: Path) -> str:
    """The GUI-grounding demo run (`benchmarks/gui-demo/`), against issue 23's 10-minute target."""
    return render_demo_run(root, "gui-demo", target_seconds=600.0)


def render_video_demo(root: Path) -> str:
    """The video demo run (`benchmarks/video-demo/`), against issue 23's 10-minute target."""
    return render_demo_run(root, "video-demo", target_seconds=600.0)


PILOT_WINDOW = (50, 60, 70, 80)
"""The pre-registered pilot rule's evaluations (`benchmarks/{gui,video}-demo/preregistration.md`): their mean ..."""
PILOT_MARGIN = 0.02
"""... at least this far (2 points) above the warm start (step 0) adopts the regime."""


def pilot_verdict(curve: dict[int, float]) -> tuple[float, bool]:
    """(mean of the window's evaluations minus step 0, whether that meets the margin) of one pilot's GRPO curve."""
    missing = [step for step in (0, *PILOT_WINDOW) if step not in curve]
    if missing:
        raise ValueError(f"pilot curve lacks the evaluations at steps {missing}")
    gain = sum(curve[step] for step in PILOT_WINDOW) / len(PILOT_WINDOW) - curve[0]
    return gain, gain >= PILOT_MARGIN - 1e-12


def render_pilots(root: Path, folder: str) -> str:
    """Markdown: every pilot run of a demo (`benchmarks/<folder>/pilot-*/`, in name order), GRPO's pilot-set curve,
    the rule's gain and verdict, and where and how long each ran."""
    pilots = sorted(path for path in (root / "benchmarks" / folder).glob("pilot-*") if path.is_dir())
    if not pilots:
        raise ValueError(f"benchmarks/{folder}: no pilot-* folders")
    lines = ["| pilot run | GRPO accuracy at the evaluated steps | mean of steps 50-80 minus step 0 | rule (+2 points)"
             " | wall s (warm start s) |", "|---|---|---|---|---|"]  # fmt: skip
    for path in pilots:
        summary, rows, timing = _read(path)
        curve = {r["step"]: r["pass_at_1"] for r in rows if r.get("kind") == "eval" and r.get("method") == "grpo"}
        shown = " / ".join(f"{step}: {100 * value:.1f}" for step, value in sorted(curve.items()))
        try:
            gain, passes = pilot_verdict(curve)
            verdict = (f"{100 * gain:+.2f}", "passes" if passes else "fails")
        except ValueError:
            verdict = ("n/a (stopped before step 80)", "not assessed")
        lines.append(f"| `{path.name}` | {shown} | {verdict[0]} | {verdict[1]} | {timing['wall_seconds']:.0f} "
                     f"({summary['warm_start_seconds']:.0f}) |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_gui_pilots(root: Path) -> str:
    """The GUI demo's regime pilots (`benchmarks/gui-demo/pilot-*`)."""
    return render_pilots(root, "gui-demo")


def render_video_pilots(root: Path) -> str:
    """The video demo's regime pilots (`benchmarks/video-demo/pilot-*`)."""
    return render_pilots(root, "video-demo")
