"""Copy the held-out completions of each `rlsd eval` of the real-model run (`runs/real[/ROUND]/eval-*/`, not
committed) into `benchmarks/real[/ROUND]/`: round 1 keeps the completion texts (`eval-*.completions.json`, for
the leakage column); later rounds keep problem, reward and text of every sample (`eval-*.samples.json`, for the
leakage column and the paired intervals).

    python benchmarks/real/collect.py                  # from the repository root, after benchmarks/real/run.sh
    python benchmarks/real/collect.py --round round2   # after ROUND=round2 ... benchmarks/real/run.sh
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--round", default="")
args = parser.parse_args()
source = Path("runs/real") / args.round
for folder in sorted(source.glob("eval-*")):
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines() if line.strip()]
    if args.round:
        out = Path("benchmarks/real") / args.round / f"{folder.name}.samples.json"
        kept = [{"problem": r["problem"], "reward": r["reward"], "completion": r["completion"]} for r in rows]
        out.write_text(json.dumps(kept, indent=0))
    else:
        out = Path("benchmarks/real") / f"{folder.name}.completions.json"
        out.write_text(json.dumps([row["completion"] for row in rows], indent=0))
    print(out, len(rows))
