"""Copy the held-out completions of each `rlsd eval` of the real-model run (`runs/real/eval-*/generations.jsonl`,
not committed) to `benchmarks/real/eval-*.completions.json` (completion texts only), for the leakage column.

    python benchmarks/real/collect.py      # from the repository root, after benchmarks/real/run.sh
"""

import json
from pathlib import Path

for folder in sorted(Path("runs/real").glob("eval-*")):
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines() if line.strip()]
    out = Path("benchmarks/real") / f"{folder.name}.completions.json"
    out.write_text(json.dumps([row["completion"] for row in rows], indent=0))
    print(out, len(rows))
