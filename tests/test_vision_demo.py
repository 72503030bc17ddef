"""The vision demo: the expression is only in the image (one token per character), the warm start is cached and
loads, and `rlsd demo --task vision --quick` trains GRPO, RLSD and OPSD end to end and writes its files."""

from __future__ import annotations

import json

import pytest
import torch

from rlsd.commands.cli import main as cli_main
from rlsd.experiments.task import TaskConfig, sample_problems
from rlsd.experiments.tiny_vlm import CELL, build_vl_processor
from rlsd.experiments.vision_task import (
    QUESTION,
    VisionWarmStartConfig,
    collate_supervised,
    load_vision_warm_start,
    make_vision_rl_dataset,
    problem_image,
    render_expression,
    vision_warm_start,
)

pytestmark = pytest.mark.slow  # end-to-end runs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_each_character_fills_its_own_image_token():
    image = render_expression("3+4*5")
    assert image.size == (5 * CELL, CELL)
    cells = [image.crop((i * CELL, 0, (i + 1) * CELL, CELL)).tobytes() for i in range(5)]
    assert len(set(cells)) == 5  # every glyph differs and sits in its own cell
    assert render_expression("3+4*5").tobytes() == image.tobytes()  # deterministic
    grid = build_vl_processor().image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 == 5  # one image token per character
    with pytest.raises(ValueError, match=r"cannot render '3/4'"):
        render_expression("3/4")


def test_the_problem_is_only_in_the_image():
    task = TaskConfig(num_operands=3)
    dataset = make_vision_rl_dataset(task, 6, seed=0)
    problems = sample_problems(task, 6, seed=0, split="train")
    assert {row["prompt"][0]["content"] for row in dataset} == {QUESTION}
    for row, problem in zip(dataset, problems, strict=True):
        assert row["solution"] == str(problem.answer)
        assert row["image"].convert("RGB").tobytes() == problem_image(problem).tobytes()


def test_supervised_batch_scores_only_the_completion():
    processor = build_vl_processor()
    problem = sample_problems(TaskConfig(num_operands=3), 1, seed=0, split="train")[0]
    batch = collate_supervised([(problem_image(problem), QUESTION, problem.solution())], processor)
    assert int(batch["mm_token_type_ids"].sum()) == 5
    scored = batch["labels"][0][batch["labels"][0] != -100].tolist()
    tokenizer = processor.tokenizer
    assert scored == [*tokenizer(problem.solution())["input_ids"], tokenizer.eos_token_id]


def test_vision_warm_start_is_cached_and_loads(cache):
    config = VisionWarmStartConfig(
        task=TaskConfig(num_operands=2), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        vision_width=16, steps=2, batch_size=4, train_pool=50,
    )  # fmt: skip
    path = vision_warm_start(config, progress=False)
    assert path.parent == cache / "vision-warmstart" and path.name == config.key()
    stamp = (path / "warmstart.json").stat().st_mtime
    assert vision_warm_start(config, progress=False) == path
    assert (path / "warmstart.json").stat().st_mtime == stamp
    model, processor = load_vision_warm_start(path)
    assert model.config.model_type == "qwen2_vl" and processor.image_processor is not None
    assert VisionWarmStartConfig(steps=3).key() != VisionWarmStartConfig(steps=2).key()
    problem = sample_problems(config.task, 1, seed=0, split="train")[0]
    with torch.no_grad():
        loss = model(**collate_supervised([(problem_image(problem), QUESTION, problem.solution())], processor)).loss
    assert torch.isfinite(loss)


def test_vision_demo_quick_writes_all_files(cache, tmp_path, capsys):
    out = tmp_path / "vision-demo"
    assert cli_main(["demo", "--task", "vision", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    phases = [line for line in printed.splitlines() if line.startswith("[")]
    assert phases[0].split("] ", 1)[1].startswith("threads: ")  # the thread count first, then a line per phase
    for phase in ("vision warm start: ", "rlsd (vision, seed 0): training, 2 steps", "credit viewer: ", "report: "):
        assert phase in printed, phase
    for name in ("metrics.jsonl", "summary.json", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "vision" and set(summary["methods"]) == {"grpo", "rlsd", "opsd"}
    for numbers in summary["methods"].values():
        assert {"initial_pass_at_1", "final_pass_at_1", "peak_pass_at_1", "final_leakage_rate",
                "seconds_per_step", "wall_seconds"} <= set(numbers)  # fmt: skip
        assert 0.0 <= numbers["final_pass_at_1"] <= 1.0 and numbers["seconds_per_step"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {r["method"] for r in evals} == {"grpo", "rlsd", "opsd"}
    assert {r["step"] for r in evals if r["method"] == "rlsd"} == {0, 1, 2}
    train = [r for r in rows if r["kind"] == "train"]
    assert any("rlsd/lambda" in r for r in train if r["method"] == "rlsd")
    assert any("rlsd/delta_mean" in r for r in train if r["method"] == "rlsd")  # the teacher scored the images
    report = (out / "report.html").read_text()
    assert 'alt="problem image" src="data:image/png;base64,' in report  # the viewer shows the image


def test_srpo_trains_every_method_from_a_perception_warm_start(cache, tmp_path):
    import hashlib
    from dataclasses import asdict

    from rlsd.experiments.vision_task import VISION_WARMSTART_FORMAT_VERSION, VisionDemoConfig, vision_solution

    plain = VisionWarmStartConfig()
    fields = {k: v for k, v in asdict(plain).items() if k != "perception"}
    payload = json.dumps({"version": VISION_WARMSTART_FORMAT_VERSION, **fields}, sort_keys=True)
    assert plain.key() == hashlib.sha256(payload.encode()).hexdigest()[:16]  # the cached warm starts keep their key
    assert VisionWarmStartConfig(perception=True).key() != plain.key()
    config = VisionDemoConfig(methods=("grpo", "srpo"))
    assert config.warm.perception and config.completion_length() == 32 + 12  # `<p>` + 5 characters + `</p>`
    assert not VisionDemoConfig(methods=("grpo", "rlsd")).warm.perception
    problem = sample_problems(TaskConfig(num_operands=3), 1, seed=0, split="train")[0]
    expression = problem.prompt.removeprefix("Q: ").removesuffix("=")
    assert vision_solution(problem, perception=True) == f"<p>{expression}</p>{problem.solution()}"
    out = tmp_path / "srpo-demo"
    command = ["demo", "--task", "vision", "--quick", "--methods", "srpo", "--out", str(out), "--no-progress"]
    assert cli_main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"srpo"} and summary["config"]["warm"]["perception"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all("rlsd/srpo_untagged_frac" in r for r in train)
