"""The citation of generated contexts in BENCHMARKS.md (section 12): per method, the share of its greedy held-out
completions that cite a context its generated source showed the teacher (`rlsd.context.citation`), next to the
reference-answer leakage and the share of the contexts that contain the answer, rendered from the metrics of one
`rlsd bench methods` run in `benchmarks/generated-citation/`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rlsd.experiments.tables import pct

CITATION = Path("benchmarks") / "generated-citation"


def _seed_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over `rows` that hold it (None when none does)."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.mean(values) if values else None


def render_generated_citation(root: Path) -> str:
    """Markdown: per method with a generated source, its seeds, the contexts recorded by the end, the citation rate
    at each evaluation (mean over seeds), the final reference-answer leakage, the training batches' mean share of
    contexts holding the answer, final pass@1 and length; a line saying so while no run exists."""
    path = root / CITATION / "metrics.jsonl"
    if not path.exists():
        return f"No run yet (`{CITATION.as_posix()}/metrics.jsonl` is absent).\n"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [row for row in rows if row.get("kind") == "eval" and "context_citation_rate" in row]
    lines = [
        "| method | seeds | contexts recorded | citing a context, by step | final leakage (reference) | "
        "contexts holding the answer | final pass@1 | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(row["method"] for row in evals):
        own = [row for row in evals if row["method"] == method]
        steps = sorted({row["step"] for row in own})
        last = [row for row in own if row["step"] == steps[-1]]
        curve = ", ".join(
            f"{step}: {pct(_seed_mean([row for row in own if row['step'] == step], 'context_citation_rate'))}"
            for step in steps
        )
        train = [row for row in rows if row.get("kind") == "train" and row.get("method") == method]
        lines.append(
            f"| {method} | {len({row['seed'] for row in own})} | {_seed_mean(last, 'context_record_size'):.0f} | "
            f"{curve} | {pct(_seed_mean(last, 'leakage_rate'))} | "
            f"{pct(_seed_mean(train, 'rlsd/context_answer_frac'))} | {pct(_seed_mean(last, 'pass_at_1'))} | "
            f"{_seed_mean(last, 'mean_length'):.1f} |"
        )
    return "\n".join(lines) + "\n"
