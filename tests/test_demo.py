"""The embedded demo: the warm start is an ordinary checkpoint, `rlsd demo --quick` writes its four files, and the
report renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlsd.commands.cli import main as cli_main
from rlsd.experiments.task import TaskConfig, sample_problems
from rlsd.experiments.warmstart import WarmStartConfig, generate, warm_start

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


def test_demo_quick_writes_all_files(cache, tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    for name in ("metrics.jsonl", "summary.json", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "rlsd", "opsd"}
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
