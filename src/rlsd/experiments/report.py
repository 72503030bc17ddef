"""Files of a demo run: `curves.png` and a self-contained `report.html` with the token-credit viewer."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rlsd.step.turns import turn_index

COLORS = {"grpo": "#1f77b4", "rlsd": "#d62728", "opsd": "#2ca02c", "grpo+opsd": "#9467bd"}


def method_colors(methods: list[str]) -> dict[str, Any]:
    """A colour per method, never two alike: the fixed ones above, then tab10's distinct hues, then tab20's."""
    from matplotlib.colors import to_hex

    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    spare = [c for c in dict.fromkeys(map(to_hex, palette)) if c not in COLORS.values()]
    colors, others = {}, iter(spare)
    for method in methods:
        colors[method] = COLORS.get(method) or next(others)
    return colors


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out pass@1 and leakage rate against the optimizer step, one line per method."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    methods = list(dict.fromkeys(r["method"] for r in evals))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = method_colors(methods)
    for method in methods:
        points = sorted((r["step"], r["pass_at_1"], r["leakage_rate"]) for r in evals if r["method"] == method)
        steps = [p[0] for p in points]
        color = colors[method]
        axes[0].plot(steps, [100 * p[1] for p in points], marker="o", ms=3, label=method, color=color)
        axes[1].plot(steps, [100 * p[2] for p in points], marker="o", ms=3, label=method, color=color)
    save_pass_and_leakage(fig, axes, path, "Held-out pass@1 (greedy)")


def save_pass_and_leakage(fig, axes, path: Path, pass_title: str) -> None:
    """Titles, grid and one legend below both panels (so that it hides no data); write the figure and close it."""
    axes[0].set(title=pass_title, xlabel="optimizer step", ylabel="%")
    axes[1].set(title="Leakage: completions citing an unseen reference", xlabel="optimizer step", ylabel="%")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = 1 + (len(labels) - 1) // 8
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _weight_color(weight: float, low: float, high: float) -> str:
    """Green above 1 (more credit or blame), red below 1, white at 1; saturated at the clip bounds."""
    if weight >= 1.0:
        strength = min(1.0, (weight - 1.0) / max(high - 1.0, 1e-9))
        return f"rgba(40, 160, 60, {0.15 + 0.7 * strength:.2f})" if strength > 0 else "transparent"
    strength = min(1.0, (1.0 - weight) / max(1.0 - low, 1e-9))
    return f"rgba(210, 50, 50, {0.15 + 0.7 * strength:.2f})"


def render_tokens(example: dict[str, Any]) -> str:
    """One completion as coloured token spans; hovering shows Delta and the weights. A multi-turn completion
    (`env_mask`: 1 for the model's tokens, 0 for what the environment wrote) shows the environment's tokens in grey
    with no credit colour, and a marker where each model turn after the first begins."""
    weights = example["clipped_weight"]
    env_mask = example.get("env_mask") or [1] * len(weights)
    model_weights = [w for w, m in zip(weights, env_mask, strict=True) if m]
    low, high = min([*model_weights, 0.8]), max([*model_weights, 1.2])
    spans = []
    for position, (token, delta, raw, clipped, mine) in enumerate(
        zip(example["tokens"], example["delta"], example["weight"], weights, env_mask, strict=True)
    ):
        if mine and position > 0 and not env_mask[position - 1]:  # a model turn resumes after the environment
            turn = turn_index(env_mask, position)
            spans.append(f'<span class="turn" data-turn="{turn}" title="model turn {turn}">turn {turn} &#9656;</span>')
        if not mine:
            tip = f"token {token!r}: written by the environment (tool result), no credit"
            spans.append(f'<span class="tok env" title="{html.escape(tip)}">{html.escape(token)}</span>')
            continue
        tip = f"token {token!r}: Delta={delta:+.3f}, w={raw:.3f}, clipped w={clipped:.3f}"
        spans.append(
            f'<span class="tok" style="background:{_weight_color(clipped, low, high)}" '
            f'title="{html.escape(tip)}" data-delta="{delta:.4f}">{html.escape(token)}</span>'
        )
    return "".join(spans)


def write_report(
    out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], viewer: dict[str, Any] | None
) -> None:
    """curves.png and report.html (the curves inline, the summary table and the credit viewer)."""
    curves = out / "curves.png"
    plot_curves(rows, curves)
    image = base64.b64encode(curves.read_bytes()).decode()
    table_rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{100 * s['initial_pass_at_1']:.1f}</td>"
        f"<td>{100 * s['final_pass_at_1']:.1f}</td><td>{100 * s['peak_pass_at_1']:.1f} (step {s['peak_step']})</td>"
        f"<td>{100 * s['final_leakage_rate']:.1f}</td><td>{s['seconds_per_step']:.2f}</td>"
        f"<td>{s['wall_seconds']:.0f}</td></tr>"
        for m, s in summary["methods"].items()
    )
    examples = ""
    for label, example in (viewer or {}).items():
        examples += (
            f"<h3>{label} completion (A {'&gt;' if example['advantage_sign'] > 0 else '&lt;'} 0)</h3>"
            f'<p class="prompt">{html.escape(example["prompt"])} (reference {example["answer"]})</p>'
            f'<div class="viewer">{render_tokens(example)}</div>'
        )
    methods = " vs ".join(name.upper() for name in summary["methods"])
    page = _PAGE.format(
        title=f"{methods} on the embedded {summary.get('task', 'arithmetic')} task",
        image=image,
        table_rows=table_rows,
        examples=examples or "<p>No completion to show.</p>",
        summary=html.escape(json.dumps(summary["config"], indent=1)),
    )
    (out / "report.html").write_text(page)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rlsd demo</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
.viewer {{ font-family: monospace; font-size: 20px; line-height: 2; word-break: break-all; }}
.tok {{ padding: 2px 1px; border-radius: 3px; }} .prompt {{ font-family: monospace; color: #555; }}
.env {{ background: #e4e4e4; color: #777; font-style: italic; }}
.turn {{ font-size: 12px; color: #fff; background: #557; border-radius: 3px; padding: 1px 4px; margin: 0 3px; }}
.legend {{ margin: 0.5em 0 1em; line-height: 1.8; }}
pre {{ font-size: 11px; background: #f6f6f6; padding: 8px; }}
</style></head><body>
<h1>{title}</h1>
<img id="curves" alt="curves" src="data:image/png;base64,{image}" style="width:100%">
<p id="leakage-note">Leakage (right panel and the "final leakage" column) counts, at each evaluation, the share of the
student's greedy completions of the held-out problems that cite a reference answer they were never shown
(<code>ref=</code>, <code>[ref</code> or the word "reference"): the student copying the teacher's privileged
context instead of solving the problem.</p>
<h2>Summary (pass@1 and leakage in %)</h2>
<table><tr><th>method</th><th>initial</th><th>final</th><th>peak</th><th>final leakage</th>
<th>s / step</th><th>wall s</th></tr>{table_rows}</table>
<h2>Token credit viewer</h2>
<p>Each token of a completion sampled from the trained policy, coloured by its clipped RLSD weight
(green: above 1, red: below 1; saturation at the clip bounds). Hover a token to see Delta, the raw
weight w = exp(sign(A) Delta) and the clipped weight.</p>
<div class="legend" id="viewer-legend"><b>Legend:</b>
<span class="tok" style="background:rgba(40, 160, 60, 0.85)">green</span> clipped weight above 1: the token gets
more of the sequence's credit (A &gt; 0) or blame (A &lt; 0) than under GRPO;
<span class="tok" style="background:transparent; border:1px solid #ccc">no colour</span> weight 1: GRPO's share;
<span class="tok" style="background:rgba(210, 50, 50, 0.85)">red</span> weight below 1: less credit or blame;
paler shades are nearer 1, full colour at the clip bounds. In a multi-turn (agent) completion,
<span class="tok env">grey italics</span> are tokens the environment wrote (tool results), which get no credit, and
<span class="turn">turn k &#9656;</span> marks where the model's turn k begins after them.</div>
{examples}
<h2>Configuration</h2><pre>{summary}</pre>
</body></html>
"""
