"""Copy finished runs between `rlsd bench methods` output folders, so that one folder holds runs trained in
several processes (shards run side by side, one thread each) or runs shared by two benchmarks (the study and the
family reuse section 1's GRPO and RLSD runs: same configuration, same seeds, so the same runs).

Usage: `python benchmarks/merge_runs.py --into DST SRC [SRC ...] [--methods a,b] [--seeds 0,1,2]`. Then
`rlsd bench methods --resume --out DST ...` (or `study --resume`) re-renders DST's tables without training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(sources: list[Path], into: Path, methods: set[str] | None, seeds: set[int] | None) -> list[str]:
    """Append every finished run of `sources` (optionally only these methods / seeds) to `into`; returns their keys."""
    into.mkdir(parents=True, exist_ok=True)
    metrics, results = into / "metrics.jsonl", into / "results.json"
    runs = json.loads(results.read_text())["runs"] if results.exists() else {}
    copied = []
    with metrics.open("a") as out:
        for source in sources:
            summaries = json.loads((source / "results.json").read_text())["runs"]
            rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if line]
            for key, summary in summaries.items():
                method, seed = key.rsplit("/", 1)
                if key in runs or (methods and method not in methods) or (seeds and int(seed) not in seeds):
                    continue
                out.writelines(json.dumps(r) + "\n" for r in rows if f"{r.get('method')}/{r.get('seed')}" == key)
                runs[key] = summary
                copied.append(key)
    results.write_text(json.dumps({"runs": runs}, indent=2))
    return copied


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--into", type=Path, required=True)
    parser.add_argument("--methods", default="")
    parser.add_argument("--seeds", default="")
    args = parser.parse_args()
    methods = {m for m in args.methods.split(",") if m} or None
    seeds = {int(s) for s in args.seeds.split(",") if s} or None
    print("copied:", ", ".join(merge(args.sources, args.into, methods, seeds)) or "nothing")
