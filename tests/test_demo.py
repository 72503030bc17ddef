"""The embedded demo: the warm start is an ordinary checkpoint, `rlsd demo --quick` writes its four files, and the
report renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlsd.commands.cli import main as cli_main
from rlsd.experiments.demo import quick_config, run_demo, with_overrides
from rlsd.experiments.task import TaskConfig, sample_problems
from rlsd.experiments.warmstart import WarmStartConfig, generate, warm_start
from rlsd.infra.threads import available_cores

pytestmark = pytest.mark.slow  # end-to-end runs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_warm_start_is_cached_and_loads_with_from_pretrained(cache):
    config = WarmStartConfig(
        task=TaskConfig(num_operands=2),
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        steps=5,
        batch_size=8,
        train_pool=100,
    )
    path = warm_start(config, progress=False)
    assert path.parent.parent == cache and path.name == config.key()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    problem = sample_problems(config.task, 1, seed=0, split="test")[0]
    assert isinstance(generate(model, tokenizer, [problem.prompt], max_new_tokens=4)[0], str)
    stamp = (path / "warmstart.json").stat().st_mtime
    assert warm_start(config, progress=False) == path  # second call: the cache, not a new run
    assert (path / "warmstart.json").stat().st_mtime == stamp
    assert WarmStartConfig(steps=6).key() != WarmStartConfig(steps=5).key()


def test_demo_quick_writes_all_files(cache, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    phases = [line for line in printed.splitlines() if line.startswith("[")]
    assert phases[0].split("] ", 1)[1].startswith("threads: ") and "available" in phases[0]  # the count, first
    for method in ("grpo", "rlsd", "opsd"):  # a line as every phase begins, bars hidden or not
        for phase in ("loading the warm start", "evaluating the warm start", "training, 4 steps", "final evaluation"):
            assert f"{method} (seed 0): {phase}" in printed, (method, phase)
    assert "warm start: 30 supervised steps" in printed and "report: writing" in printed
    for name in ("metrics.jsonl", "summary.json", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "rlsd", "opsd"}
    timing = json.loads((out / "timing.json").read_text())  # written by the run, with its provenance (issue 26)
    assert timing["wall_seconds"] > 0 and timing["provenance"] == summary["provenance"]
    assert summary["provenance"]["command_line"] == f"rlsd demo --quick --out {out} --no-progress"
    for numbers in summary["methods"].values():
        assert {"initial_pass_at_1", "final_pass_at_1", "peak_pass_at_1", "final_leakage_rate",
                "seconds_per_step", "wall_seconds"} <= set(numbers)  # fmt: skip
        assert 0.0 <= numbers["final_pass_at_1"] <= 1.0 and numbers["seconds_per_step"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows if r["kind"] == "eval"} == {"grpo", "rlsd", "opsd"}
    assert any("rlsd/lambda" in r for r in rows if r["kind"] == "train")
    config = summary["config"]
    for row in (r for r in rows if r["kind"] == "eval"):  # per-problem outcomes, one character per problem
        assert len(row["correct"]) == config["eval_size"] and set(row["correct"]) <= {"0", "1"}
        assert row["pass_at_1"] == row["correct"].count("1") / config["eval_size"]
    sampled = [r for r in rows if r["kind"] == "sampled"]
    assert sorted((r["method"], r["step"]) for r in sampled) == sorted(
        (m, s) for m in ("grpo", "rlsd", "opsd") for s in (0, config["steps"])
    )
    for row in sampled:
        counts = [int(c) for c in row["correct_counts"]]
        assert len(counts) == config["eval_size"] and max(counts) <= config["sample_k"]
        assert row["sampled_pass_at_1"] == sum(counts) / (config["sample_k"] * len(counts))
        assert row["sampled_pass_at_k"] == sum(c > 0 for c in counts) / len(counts)
    diagnostics = [r for r in rows if r["kind"] == "diagnostics"]
    assert len(diagnostics) == 6 and all(
        len(r["delta_by_position"]) == config["max_completion_length"] for r in diagnostics
    )
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'class="tok"' in page and "Delta=" in page


def test_demo_shows_threads_and_every_phase_with_bars(cache, tmp_path, capsys):
    """`threads` overrides the choice, is undone after the run, and each phase's bar carries an estimate."""
    before = torch.get_num_threads()
    config = with_overrides(quick_config(tmp_path / "demo"), methods=("rlsd",))
    summary = run_demo(config, progress=True, threads=1)
    assert summary["threads"] == 1 and torch.get_num_threads() == before
    printed = capsys.readouterr()
    lines = [line.split("] ", 1)[1] for line in printed.out.splitlines() if line.startswith("[")]
    assert lines[0] == f"threads: 1 (of {available_cores()} available, from --threads; --threads to override)"
    expected = ["warm start: 30 supervised steps", "rlsd (seed 0): loading the warm start",
                "rlsd (seed 0): evaluating the warm start", "rlsd (seed 0): training, 4 steps",
                "rlsd (seed 0): final evaluation", "credit viewer: sampling 24 completions",
                "report: writing"]  # fmt: skip
    assert [next(i for i, line in enumerate(lines) if line.startswith(e)) for e in expected] == list(range(1, 8))
    bars = printed.err.replace("\r", "\n")
    for desc in ("warm start", "rlsd (seed 0)", "greedy pass@1", "sampled pass@2", "diagnostics: scoring"):
        assert any(line.startswith(desc + ":") and "<" in line for line in bars.splitlines()), desc  # elapsed<left


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(cache, tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress", "--methods", "rlsd"]) == 0
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert 'id="curves"' in dom and dom.count('class="tok"') > 5
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,1600",
         (out / "report.html").as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 20_000
