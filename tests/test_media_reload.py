"""Image and frame files are read again on every load: `datasets` keys its map cache on the dataset file and the
conversion function, not on the image files a row names, so a cached conversion skipped the frame budget and the
image checks (and kept the old pixels) after frames were re-extracted or an image replaced beside the same jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rlsd.commands.train import make_parser
from rlsd.data.datasets import load_cli_dataset
from rlsd.infra.validate import DatasetError

FLAGS = ["--model_name_or_path", "m", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]


def load(tmp_path: Path, data: Path, *extra: str):
    """The dataset `rlsd train` builds from `data` (its parser, then its dataset builder)."""
    script, _training, _model = make_parser().parse_args_and_config(
        args=["--dataset_name", str(data), *FLAGS, "--output_dir", str(tmp_path / "out"), *extra]
    )
    return load_cli_dataset(script, script.dataset_name, script.dataset_train_split)


def test_frames_added_after_a_first_load_are_counted_against_the_budget(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 6), (10 * i,) * 3).save(clip / f"{i:05d}.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "How many?", "answer": "2", "videos": ["clip"]}) + "\n")
    assert len(load(tmp_path, data, "--video_max_frames", "2")[0]["images"]) == 2
    Image.new("RGB", (8, 6), (30,) * 3).save(clip / "00002.png")
    with pytest.raises(DatasetError, match=r"row 0 .*holds 3 frames, over the frame budget of 2"):
        load(tmp_path, data, "--video_max_frames", "2")


def test_an_image_replaced_after_a_first_load_is_read_again(tmp_path):
    Image.new("RGB", (8, 6), (200, 0, 0)).save(tmp_path / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"image": "a.png", "question": "Q", "answer": "1"}) + "\n")
    assert load(tmp_path, data)[0]["image"].getpixel((0, 0)) == (200, 0, 0)
    Image.new("RGB", (8, 6), (0, 0, 200)).save(tmp_path / "a.png")
    assert load(tmp_path, data)[0]["image"].getpixel((0, 0)) == (0, 0, 200)
