"""`benchmarks/gpu/check.sh --smoke` on CPU: the table has the GRPO and RLSD rows with numbers, the JSON names the
device, and every row that does not run says why."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("grpo", "rlsd-live", "rlsd-synced")
VLLM = ("vllm-colocate", "vllm-served-teacher")


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
    assert {r["row"] for r in report["rows"]} >= {*CORE, "fsdp2-distill", "zero3-synced", "zero3-live", *VLLM}
    if importlib.util.find_spec("vllm") is None:  # the project's venv: the vLLM rows say why they did not run
        assert "vllm: not importable" in result.stdout
        for name in VLLM:
            assert rows[name][1] == "skipped" and "vllm is not importable" in rows[name][6], rows[name]


def load_check():
    """benchmarks/gpu/check.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_served_teacher_row_is_compared_with_the_trainer_teacher_row():
    """The served teacher's step and teacher pass as ratios to vllm-colocate's (same run, trainer's teacher), both
    steps as ratios to GRPO's: 3.0 / 2.0 = 1.5, 0.5 / 1.0 = 0.5, 2.0 / 1.0, 3.0 / 1.0."""
    check = load_check()
    rows = [
        {"row": "grpo", "status": "ok", "step_s": 1.0},
        {"row": "vllm-colocate", "status": "ok", "step_s": 2.0, "teacher_s": 1.0},
        {"row": "vllm-served-teacher", "status": "ok", "step_s": 3.0, "teacher_s": 0.5},
    ]
    check.add_ratios(rows)
    assert [r.get("time_ratio") for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["step_ratio_to_trainer_teacher"] == 1.5 and rows[2]["teacher_ratio_to_trainer_teacher"] == 0.5
    assert rows[1]["note"].startswith("teacher pass 1.000 s")
    assert rows[2]["note"].endswith("x vllm-colocate: step 1.50, teacher pass 0.50")
    assert check.main(["--smoke", "--rows", "grpo,nope"]) == 2  # an unknown row is refused by name
