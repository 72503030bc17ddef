"""The video task: a clip shows the expression one character per frame, fed to the tiny Qwen2-VL as frames given as
images; bad clips are refused naming the row before any step; `rlsd demo --task video --quick` trains GRPO and VISD
end to end and writes its files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from rlsd.commands.cli import main as cli_main
from rlsd.data.videos import check_frame_rows
from rlsd.experiments.task import Problem, TaskConfig, evaluation_problems, is_heldout, sample_problems
from rlsd.experiments.tiny_vlm import CELL, build_vl_processor
from rlsd.experiments.video_task import (
    QUESTION,
    clip_frames,
    collate_clips,
    make_video_rl_dataset,
    pilot_problems,
    video_rows,
)
from rlsd.experiments.vision_task import render_expression
from rlsd.infra.validate import DatasetError

PROBLEM = Problem((3, 4, 5), ("+", "*"))


def test_each_frame_shows_one_character_in_order_and_is_one_image_token():
    frames = clip_frames(PROBLEM)
    assert len(frames) == 5 and all(frame.size == (CELL, CELL) for frame in frames)
    assert [frame.tobytes() for frame in frames] == [render_expression(c).tobytes() for c in "3+4*5"]
    processor = build_vl_processor(max_tokens_per_image=1)
    grids = processor.image_processor(images=frames, return_tensors="pt")["image_grid_thw"]
    assert (grids.prod(-1) // 4).tolist() == [1] * 5  # one image token per frame


def test_the_problem_is_only_in_the_frames():
    task = TaskConfig(num_operands=3)
    dataset = make_video_rl_dataset(task, 4, seed=0)
    problems = sample_problems(task, 4, seed=0, split="train")
    for row, problem in zip(dataset, problems, strict=True):
        assert row["prompt"] == [{"role": "user", "content": QUESTION}] and row["solution"] == str(problem.answer)
        assert row["frame_text"] == problem.prompt.removeprefix("Q: ").removesuffix("=")
        assert [f.convert("RGB").tobytes() for f in row["images"]] == [f.tobytes() for f in clip_frames(problem)]


def test_supervised_batch_scores_only_the_completion_after_one_image_token_per_frame():
    processor = build_vl_processor(max_tokens_per_image=1)
    batch = collate_clips([(clip_frames(PROBLEM), QUESTION, PROBLEM.solution())], processor)
    assert int(batch["mm_token_type_ids"].sum()) == 5 and batch["image_grid_thw"].shape == (5, 3)
    scored = batch["labels"][0][batch["labels"][0] != -100].tolist()
    tokenizer = processor.tokenizer
    assert scored == [*tokenizer(PROBLEM.solution())["input_ids"], tokenizer.eos_token_id]


FRAME = Image.new("RGB", (CELL, CELL), (255, 255, 255))


@pytest.mark.parametrize(
    ("clips", "message"),
    [
        ([[FRAME], []], r"row 1 of the clips, column 'images': has no frames"),
        ([[FRAME], [FRAME] * 4], r"row 1 of the clips, column 'images': holds 4 frames, over the frame budget of 3"),
        (
            [[FRAME], None, [FRAME]],
            r"row 1 of the clips: has no video while other rows do \(1 of 3 rows without one\): "
            r"mixed rows with and without video",
        ),
        ([None, None], r"the clips: has no row with a video in column 'images'"),
    ],
    ids=["no-frames", "over-budget", "mixed", "no-video"],
)
def test_bad_clips_are_refused_naming_the_row(clips, message):
    with pytest.raises(DatasetError, match=message):
        video_rows(clips, [PROBLEM] * len(clips), 3, "the clips")
    with pytest.raises(DatasetError, match=message):
        check_frame_rows(clips, 3, "the clips")


def test_a_task_whose_clips_exceed_the_frame_budget_is_refused_before_any_step():
    with pytest.raises(DatasetError, match=r"row 0 of the video task's train clips, column 'images': holds 5 frames, "
                                           r"over the frame budget of 4"):  # fmt: skip
        make_video_rl_dataset(TaskConfig(num_operands=3), 4, seed=0, max_frames=4)


def test_the_pilot_set_is_every_test_problem_outside_the_held_out_set():
    task = TaskConfig(num_operands=3)
    pilot = pilot_problems(task, 175)
    held = {p.prompt for p in evaluation_problems(task, 500)}
    assert len({p.prompt for p in pilot}) == 175 and not held & {p.prompt for p in pilot}
    assert all(is_heldout(p, task) for p in pilot)  # the test split
    assert pilot_problems(task, 10) == pilot[:10]  # a fixed order
    with pytest.raises(ValueError, match=r"has 175 problems, 176 requested"):
        pilot_problems(task, 176)


@pytest.mark.slow
def test_video_demo_quick_writes_each_methods_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "video-demo"
    command = ["demo", "--task", "video", "--quick", "--methods", "grpo,visd", "--out", str(out), "--no-progress"]
    assert cli_main(command) == 0
    printed = capsys.readouterr().out
    for phase in ("video warm start: ", "visd (video, seed 0): training, 2 steps", "credit viewer: sampling "
                  "completions of visd's policy", "report: "):  # fmt: skip
        assert phase in printed, phase
    for name in ("metrics.jsonl", "summary.json", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "video" and set(summary["methods"]) == {"grpo", "visd"}
    for numbers in summary["methods"].values():
        assert {"initial_pass_at_1", "final_pass_at_1", "seconds_per_step"} <= set(numbers)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train" and r["method"] == "visd"]
    assert len(train) == 2 and all(r["rlsd/context_generator_calls"] == 8.0 for r in train)  # every row judged
    assert all("rlsd/judge_grounding_flagged_frac" in r and "rlsd/delta_mean" in r for r in train)
    report = (out / "report.html").read_text()
    assert 'alt="problem image" src="data:image/png;base64,' in report and "|answer: " in report  # frames, feedback
