"""Provenance written by the code: a bench run records its commit, CPU model, thread count and command line in its raw
results and writes its own timing.json; raw files from before say "not recorded" when rendered."""

from __future__ import annotations

import json

import pytest

from rlsd.experiments.provenance import (
    NOT_RECORDED,
    cpu_model,
    describe,
    render_provenance,
    started_at,
    write_timing,
)


def test_cpu_model_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    info.write_text("processor\t: 0\n")
    assert cpu_model(info) is None and cpu_model(tmp_path / "absent") is None


def test_raw_files_without_provenance_render_not_recorded(tmp_path):
    assert set(describe(None).values()) == {NOT_RECORDED}
    old, new = tmp_path / "benchmarks" / "old", tmp_path / "benchmarks" / "new"
    old.mkdir(parents=True)
    (old / "results.json").write_text(json.dumps({"runs": {}}))
    (old / "timing.json").write_text(json.dumps({"make_demo_seconds": 382}))  # a hand-typed record
    write_timing(new, ["rlsd", "bench", "cost", "--quick"], 12.3)
    made = json.loads((new / "timing.json").read_text())["provenance"]
    (new / "cost.json").write_text(json.dumps({"results": {}, "provenance": {**made, "cpu_model": "Some CPU"}}))
    table = render_provenance(tmp_path)
    assert (
        f"| `old/results.json` | {NOT_RECORDED} | {NOT_RECORDED} | {NOT_RECORDED} | {NOT_RECORDED} | typed by hand |"
        in table
    )
    assert "| `new/cost.json` |" in table and "| Some CPU |" in table and "`rlsd bench cost --quick`" in table
    assert "| 12 s |" in table


def test_started_at_is_read_and_a_bad_value_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("RLSD_STARTED_AT", raising=False)
    assert started_at() is None
    monkeypatch.setenv("RLSD_STARTED_AT", "yesterday")
    with pytest.raises(ValueError, match="RLSD_STARTED_AT must be Unix seconds"):
        started_at()
    monkeypatch.setenv("RLSD_STARTED_AT", "1000.5")  # long ago: the enclosing command's wall time is recorded
    timing = write_timing(tmp_path, ["rlsd", "demo"], 1.0)
    assert timing["enclosing_wall_seconds"] > 1e9 and timing["wall_seconds"] == 1.0
