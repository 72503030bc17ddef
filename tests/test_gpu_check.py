"""`benchmarks/gpu/check.sh --smoke` on CPU: the table has the GRPO and RLSD rows with numbers, the JSON names the
device, and every row that does not run says why."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("grpo", "rlsd-live", "rlsd-synced")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The markdown table's data rows, keyed by row name."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 7 and cells[0] not in ("row", "---"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    """The smoke run exits 0, prints numeric step times for grpo / rlsd-live / rlsd-synced and writes the JSON."""
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = ["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    for name in CORE:
        assert rows[name][1] == "ok", rows[name]
        assert re.fullmatch(r"\d+\.\d+", rows[name][2]), rows[name]
    assert rows["grpo"][3] == "1.00"
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (smoke)"
    assert report["versions"]["trl"] and report["versions"]["torch"]
    for row in report["rows"]:
        if row["status"] not in ("ok", "refused as designed"):
            assert row.get("reason"), row
    assert {r["row"] for r in report["rows"]} >= {*CORE, "fsdp2-distill", "zero3-synced", "zero3-live"}
