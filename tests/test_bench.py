"""The benchmark harness in its quick mode: every file written, tables filled, ratios computed in one run."""

from __future__ import annotations

import json

import pytest

from rlsd.experiments.bench import main as bench_main
from rlsd.experiments.bench import methods_table, render_methods_table

pytestmark = pytest.mark.slow  # end-to-end runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One warm-start cache for the module: the quick warm start (and the external teacher) is built once, not per
    test; no test here checks the cache itself (test_demo does)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLSD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_bench_methods_quick(cache, tmp_path):
    out = tmp_path / "methods"
    argv = ["methods", "--quick", "--seeds", "2", "--methods", "grpo,rlsd,sdpo", "--out", str(out), "--no-progress"]
    assert bench_main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["runs"]) == {f"{m}/{s}" for m in ("grpo", "rlsd", "sdpo") for s in (0, 1)}
    assert set(result["table"]) == {"grpo", "rlsd", "sdpo"} and result["table"]["rlsd"]["seeds"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rlsd/lambda" in r for r in rows if r.get("method") == "rlsd" and r["kind"] == "train")
    assert (out / "curves.png").stat().st_size > 0 and "| rlsd |" in (out / "table.md").read_text()
    assert_provenance(out, "results.json", argv)
    assert result["runs"]["rlsd/1"]["provenance"]["command_line"] == "rlsd bench " + " ".join(argv)  # per run


def assert_provenance(out, name: str, argv: list[str]) -> None:
    """The raw result `name` and timing.json in `out` record the commit, CPU model, thread count and command line
    (issue 26, item 6), and timing.json the run's wall time."""
    import re

    import torch

    from rlsd.experiments.provenance import cpu_model

    timing = json.loads((out / "timing.json").read_text())
    for made in (json.loads((out / name).read_text())["provenance"], timing["provenance"]):
        assert re.fullmatch(r"[0-9a-f]{40}", made["commit"]) and isinstance(made["commit_dirty"], bool)
        assert made["cpu_model"] == cpu_model() and made["torch_threads"] == torch.get_num_threads()
        assert made["command_line"] == "rlsd bench " + " ".join(argv)
    assert timing["wall_seconds"] > 0


def test_bench_methods_resume_adds_seeds_and_keeps_finished_runs(cache, tmp_path):
    out = tmp_path / "methods"
    base = ["methods", "--quick", "--methods", "grpo", "--out", str(out), "--no-progress"]
    assert bench_main([*base, "--seeds", "1"]) == 0
    first = (out / "metrics.jsonl").read_text()
    assert bench_main([*base, "--seeds", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "metrics.jsonl").read_text().startswith(first)  # seed 0 kept as it was, not trained again
    assert sorted({r["seed"] for r in rows}) == [0, 1]
    assert json.loads((out / "results.json").read_text())["table"]["grpo"]["seeds"] == 2


def test_greedy_only_runs_train_exactly_like_full_runs(cache, tmp_path):
    """Sampled pass@k and the teacher diagnostics fork the RNG, so skipping them changes no training step."""
    curves = {}
    for name, extra in (("full", []), ("greedy", ["--greedy-only"])):
        out = tmp_path / name
        assert bench_main(["methods", "--quick", "--seeds", "1", "--methods", "rlsd", "--out", str(out),
                           "--no-progress", *extra]) == 0  # fmt: skip
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r.get("loss"), r.get("pass_at_1")) for r in rows if r["kind"] in ("train", "eval")]
        kinds = {r["kind"] for r in rows}
        assert ({"sampled", "diagnostics"} <= kinds) == (name == "full")
    assert curves["full"] == curves["greedy"]


def test_methods_table_reach_step_and_spread():
    rows = [
        {"kind": "eval", "method": m, "seed": s, "step": step, "pass_at_1": v, "leakage_rate": 0.0, "mean_length": 9}
        for m, curve in {"grpo": [0.2, 0.3, 0.4], "rlsd": [0.2, 0.4, 0.5]}.items()
        for s in (0, 1)
        for step, v in zip((0, 5, 10), [x + 0.02 * s for x in curve], strict=True)
    ]
    table = methods_table(rows, ("grpo", "rlsd"), steps=10)
    assert table["grpo"]["final_mean"] == pytest.approx(0.41)
    assert table["grpo"]["final_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert table["rlsd"]["reaches_grpo_final_at"] == 5  # mean 0.41 at step 5 >= GRPO's final 0.41
    assert table["rlsd"]["peak_step"] == 10
    assert "| rlsd | 51.0 ± 1.4 |" in render_methods_table(table)


def test_bench_cost_quick(cache, tmp_path):
    out = tmp_path / "cost"
    argv = ["cost", "--quick", "--configs", "grpo,rlsd-live", "--steps", "2", "--warmup", "1", "--out", str(out)]
    assert bench_main(argv) == 0
    cost = json.loads((out / "cost.json").read_text())["results"]
    assert cost["grpo"]["step_ratio_to_grpo"] == 1.0
    assert cost["rlsd-live"]["teacher_s_median"] > 0 and cost["grpo"]["teacher_s_median"] == 0
    assert cost["rlsd-live"]["peak_rss_mib"] > 0
    assert_provenance(out, "cost.json", argv)


def test_bench_study_quick_pairs_every_knob_with_grpo(cache, tmp_path):
    out = tmp_path / "study"
    argv = ["study", "--quick", "--seeds", "2", "--configs", "grpo,rlsd-const", "--out", str(out), "--no-progress"]
    assert bench_main(argv) == 0
    study = json.loads((out / "results.json").read_text())["study"]
    assert study["grpo"]["diff_mean"] == 0.0 and study["grpo"]["diff_ci95"] == [0.0, 0.0]
    assert len(study["rlsd-const"]["scores"]) == 2
    assert "| rlsd-const |" in (out / "study.md").read_text()
    assert_provenance(out, "results.json", argv)


def test_bench_family_members_run_in_methods_and_cost(cache, tmp_path):
    """The family's distillation loss and sibling context go through both harnesses like the baselines."""
    out = tmp_path / "family"
    argv = ["methods", "--quick", "--seeds", "1", "--methods", "grpo,sdpg,rlsd-sibling", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert bench_main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {m: [r for r in rows if r.get("method") == m and r["kind"] == "train"] for m in ("sdpg", "rlsd-sibling")}
    assert all("rlsd/ref_penalty" in r for r in train["sdpg"])
    assert all("rlsd/no_context_frac" in r for r in train["rlsd-sibling"])
    argv = ["cost", "--quick", "--configs", "grpo,opsd-jsd", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    cost = json.loads((tmp_path / "cost.json").read_text())["results"]
    assert cost["opsd-jsd"]["step_ratio_to_grpo"] > 0


def test_bench_external_teacher_methods_and_trl_distillation_anchor(cache, tmp_path):
    """OPD's entries train from the demo's larger external teacher (warm-started and cached on first use), TRL's
    DistillationTrainer runs on opd-jsd's configuration with that teacher, and the teacher's own score is recorded."""
    from dataclasses import replace

    from rlsd.experiments.bench import distillation_builder
    from rlsd.experiments.demo import quick_config, trainer_args
    from rlsd.experiments.task import make_rl_dataset
    from rlsd.experiments.warmstart import load_warm_start, warm_start

    out = tmp_path / "teachers"
    argv = ["methods", "--quick", "--seeds", "1", "--methods", "opd-jsd,trl-distill", "--out", str(out),
            "--no-progress", "--greedy-only"]  # fmt: skip
    assert bench_main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("teacher_eval") == 1
    for method in ("opd-jsd", "trl-distill"):
        losses = [r["loss"] for r in rows if r.get("method") == method and r["kind"] == "train"]
        assert losses and all(loss > 0 for loss in losses)
    config = replace(quick_config(out), steps=1)
    teacher_path = str(warm_start(config.external_teacher(), progress=False))
    assert teacher_path != str(warm_start(config.warm, progress=False))
    assert trainer_args(config, "opd").teacher_model == teacher_path
    assert trainer_args(config, "grpo").teacher_model is None
    model, tokenizer = load_warm_start(warm_start(config.warm, progress=False))
    dataset = make_rl_dataset(config.warm.task, 8, seed=0, split="train")
    peer = distillation_builder(config)(model, tokenizer, dataset, [])
    assert peer.teacher_model.config.hidden_size == config.external_teacher().hidden_size != model.config.hidden_size
    assert peer.args.beta == trainer_args(config, "opd-jsd").distill_jsd_beta


def test_cost_harness_times_the_trainer_each_peer_name_says(cache, tmp_path, monkeypatch):
    """`bench cost --configs trl-distill` times TRL's DistillationTrainer, the trainer `bench methods` trains under
    that name (SDPOTrainer was timed under it before), and records the class it timed."""
    from transformers import Trainer
    from trl import DistillationTrainer

    from rlsd.experiments.bench import cost_once
    from rlsd.experiments.demo import quick_config

    trained = []
    train = Trainer.train

    def spy(self, *args, **kwargs):
        trained.append(type(self))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    result = cost_once("trl-distill", quick_config(tmp_path), steps=1, warmup=1)
    assert trained == [DistillationTrainer]
    assert result["trainer"] == "DistillationTrainer" and result["step_s_median"] > 0


def test_cost_trainer_builds_each_peer_from_peers_and_every_other_name_as_rlsd(cache, tmp_path):
    from trl import DistillationTrainer
    from trl.experimental.sdpo import SDPOTrainer

    from rlsd.experiments.bench import PEERS, cost_trainer
    from rlsd.experiments.demo import quick_config
    from rlsd.experiments.task import make_rl_dataset
    from rlsd.experiments.warmstart import load_warm_start, warm_start
    from rlsd.trainer import RLSDTrainer

    config = quick_config(tmp_path)
    model, tokenizer = load_warm_start(warm_start(config.warm, progress=False))
    dataset = make_rl_dataset(config.warm.task, 8, seed=0)
    expected = {"trl-distill": DistillationTrainer, "sdpo": SDPOTrainer, "rlsd-live": RLSDTrainer}
    assert set(PEERS) == {"trl-distill", "sdpo"}
    for name, cls in expected.items():
        assert type(cost_trainer(name, config, model, tokenizer, dataset)) is cls, name


def test_every_catalogue_method_builds_its_bench_config(tmp_path):
    """Each method the bench can train (`rlsd bench methods --methods NAME`) has a config that the demo's shared
    budget does not contradict (a method whose source does not fill the demo's `{answer}` template sets its own)."""
    from rlsd.experiments.demo import quick_config, trainer_args
    from rlsd.experiments.methods import CATALOGUE

    config = quick_config(tmp_path / "out")
    for method, overrides in CATALOGUE.items():
        if overrides is not None and overrides.get("teacher") != "external":
            assert trainer_args(config, method).credit == overrides.get("credit", "grpo"), method
