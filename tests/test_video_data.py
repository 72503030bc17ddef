"""Issue 23 items 5 and 1 from the command line: EasyVideoR1-format video rows (frames as images, the frame budget, the
bad-input errors naming the row) and the box transforms' `teacher_box` column kept by `rlsd train`'s dataset builder.
Tiny frames are drawn here; no model is loaded, no training step runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rlsd.commands.train import check_teacher_inputs, make_parser
from rlsd.context.transforms import BOX_COLUMN, apply_transform
from rlsd.data.datasets import load_cli_dataset
from rlsd.data.formats import KEPT_COLUMNS
from rlsd.infra.validate import ConfigError, DatasetError

FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--output_dir"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def frames(folder: Path, count: int, size: tuple[int, int] = (8, 6)) -> Path:
    """`count` tiny frames of `size` in `folder`, frame i filled with grey level 10 * i."""
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i,) * 3).save(folder / f"{i:05d}.png")
    return folder


def parse_and_load(tmp_path: Path, data: Path, *extra: str):
    """The dataset `rlsd train` builds from these flags (its parser, then its dataset builder), and its options."""
    script, training, _model = make_parser().parse_args_and_config(
        args=["--dataset_name", str(data), "--model_name_or_path", "m", *FLAGS, str(tmp_path / "out"), *extra]
    )
    return load_cli_dataset(script, script.dataset_name, script.dataset_train_split), training


# ------------------------------------------------------------------------------------------------ teacher_box
def test_the_kept_column_is_the_box_transforms_column():
    assert KEPT_COLUMNS == (BOX_COLUMN,)


def test_rlsd_train_keeps_teacher_box_for_the_box_transforms(tmp_path):
    Image.new("RGB", (10, 8), "white").save(tmp_path / "screen.png")
    rows = [{"image": "screen.png", "question": "Click OK", "answer": "5", BOX_COLUMN: [2, 1, 6, 5]},
            {"image": "screen.png", "question": "Click No", "answer": "7", BOX_COLUMN: [0, 0, 10, 8]}]  # fmt: skip
    data = write_jsonl(tmp_path / "gui.jsonl", rows)
    dataset, training = parse_and_load(tmp_path, data, "--teacher_transform", "draw_box")
    assert training.teacher_transform == "draw_box"
    assert set(dataset.column_names) == {"prompt", "image", "solution", BOX_COLUMN}
    assert dataset[BOX_COLUMN] == [[2, 1, 6, 5], [0, 0, 10, 8]]
    check_teacher_inputs(dataset, training.teacher_transform)
    row = dataset[0]
    _, drawn = apply_transform("draw_box", row["prompt"], [row["image"]], row, "row 0")
    assert drawn[0].getpixel((2, 1)) == (255, 0, 0) and drawn[0].getpixel((7, 6)) == (255, 255, 255)
    # a text format keeps it too
    text = write_jsonl(tmp_path / "t.jsonl", [{"question": "1+1", "answer": "#### 2", BOX_COLUMN: [0, 0, 1, 1]}])
    assert parse_and_load(tmp_path, text)[0][BOX_COLUMN] == [[0, 0, 1, 1]]


def test_a_box_outside_its_image_is_refused_before_the_model_loads_naming_the_row(tmp_path):
    Image.new("RGB", (10, 8), "white").save(tmp_path / "screen.png")
    rows = [{"image": "screen.png", "question": "q", "answer": "1", BOX_COLUMN: [0, 0, 4, 4]},
            {"image": "screen.png", "question": "q", "answer": "1", BOX_COLUMN: [5, 5, 12, 7]}]  # fmt: skip
    dataset, training = parse_and_load(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), "--teacher_transform",
                                       "crop_to_box")  # fmt: skip
    with pytest.raises(ConfigError, match=r"--teacher_transform: train_dataset row 1: .*\[5, 5, 12, 7\].*10x8"):
        check_teacher_inputs(dataset, training.teacher_transform)


# ------------------------------------------------------------------------------------------------ EasyVideoR1 rows
def test_easyvideor1_rows_become_frames_as_images(tmp_path):
    frames(tmp_path / "clip0", 3)
    frames(tmp_path / "clip1", 2, size=(4, 4))
    rows = [
        {"problem": "<video>How many dots?", "answer": "<answer>3</answer>", "videos": ["clip0"],
         "problem_type": "numerical", "data_type": "video"},
        {"problem": "Which colour?", "answer": "B", "videos": [["clip1/00000.png", "clip1/00001.png"], "clip0"],
         "problem_type": "multiple choice", "options": ["A. red", "B. grey"], "data_type": "video"},
    ]  # fmt: skip
    dataset, _ = parse_and_load(tmp_path, write_jsonl(tmp_path / "v.jsonl", rows))  # format detected
    assert set(dataset.column_names) == {"prompt", "images", "solution", "problem_type"}
    assert dataset["solution"] == ["3", "B"] and dataset["problem_type"] == ["numerical", "multiple choice"]
    first, second = dataset[0], dataset[1]
    assert [image.getpixel((0, 0)) for image in first["images"]] == [(0, 0, 0), (10, 10, 10), (20, 20, 20)]
    assert [image.size for image in second["images"]] == [(4, 4)] * 2 + [(8, 6)] * 3  # videos in order
    question = second["prompt"][-1]["content"]
    assert question.startswith("Which colour?\nA. red\nB. grey\n") and "<video>" not in first["prompt"][-1]["content"]


@pytest.mark.parametrize(
    ("videos", "flags", "message"),
    [
        (
            ["clip.mp4"],
            [],
            r"row 1 of .*video 0: names the video file .*clip.mp4, which is not decoded here.*"
            r"ffmpeg -i .*clip.mp4 -vf fps=2",
        ),
        (["empty"], [], r"row 1 of .*column 'videos', video 0: has no frames"),
        (
            ["clip0", "clip0"],
            ["--video_max_frames", "5"],
            r"row 1 of .*column 'videos': holds 6 frames, over the "
            r"frame budget of 5.*--video_max_frames",
        ),
        (None, [], r"row 1 of .*has no video while other rows do \(1 of 2 rows without one\): mixed rows"),
        (["nowhere"], [], r"row 1 of .*video 0: names the frame folder .*nowhere, which does not exist"),
    ],
    ids=["video-file", "no-frames", "over-budget", "mixed", "missing-folder"],
)
def test_bad_video_rows_are_refused_naming_the_row(tmp_path, videos, flags, message):
    frames(tmp_path / "clip0", 3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    rows = [{"problem": "q", "answer": "1", "videos": ["clip0"]}, {"problem": "q", "answer": "2", "videos": videos}]
    with pytest.raises(DatasetError, match=message):
        parse_and_load(tmp_path, write_jsonl(tmp_path / "v.jsonl", rows), *flags)


def test_a_video_set_with_no_video_at_all_points_to_the_image_and_text_formats(tmp_path):
    rows = [{"problem": "q", "answer": "1", "videos": []}]
    with pytest.raises(DatasetError, match=r"has no row with a video.*mmfinereason"):
        parse_and_load(tmp_path, write_jsonl(tmp_path / "v.jsonl", rows), "--dataset_format", "easyvideor1")


def test_a_nonpositive_frame_budget_is_refused(tmp_path, tiny_model_dir, capsys):
    from rlsd.commands.cli import main as cli_main

    assert cli_main(["train", "--dataset_name", "d.jsonl", "--model_name_or_path", str(tiny_model_dir),
                     "--video_max_frames", "0", *FLAGS, str(tmp_path / "out")]) == 2  # fmt: skip
    assert "--video_max_frames: must be >= 1, got 0" in capsys.readouterr().err


def test_multiple_choice_and_numerical_rows_score_with_math_accuracy(tmp_path):
    """The mapping the module documents: the converted `solution` of a letter and of a number, through math-verify."""
    from rlsd.data.rewards import math_accuracy

    frames(tmp_path / "clip0", 1)
    rows = [{"problem": "q", "answer": "<answer>B</answer>", "videos": ["clip0"], "problem_type": "multiple choice"},
            {"problem": "q", "answer": "3.5", "videos": ["clip0"], "problem_type": "numerical"}]  # fmt: skip
    solution = parse_and_load(tmp_path, write_jsonl(tmp_path / "v.jsonl", rows))[0]["solution"]
    assert math_accuracy(["\\boxed{B}", "\\boxed{3.50}"], solution) == [1.0, 1.0]
    assert math_accuracy(["\\boxed{C}", "\\boxed{3.499}"], solution) == [0.0, 0.0]
