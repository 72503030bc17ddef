"""Image datasets: the MMFineReason and MathVista adapters on the fixtures in tests/fixtures (their PNGs drawn here),
the errors for a missing image column, a missing or unreadable image and a bad choice, and `rlsd train` then
`rlsd eval` on images with a tiny Qwen2-VL."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from PIL import Image

from rlsd.commands.cli import main as cli_main
from rlsd.data.datasets import load_rlsd_dataset, to_rlsd_rows
from rlsd.data.images import CHOICE_INSTRUCTION, detect_image_format, load_image, load_processor
from rlsd.infra.validate import DatasetError

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"0.png": (200, 30, 30), "1.png": (30, 200, 30), "2.png": (30, 30, 200)}


def copy_fixture(name: str, tmp_path: Path) -> Path:
    """The fixture's jsonl copied into tmp_path with its images drawn beside it (no binary files committed)."""
    source = next((FIXTURES / name).glob("*.jsonl"))
    target = tmp_path / name
    target.mkdir()
    shutil.copy(source, target / source.name)
    (target / "images").mkdir()
    for file, colour in COLOURS.items():
        Image.new("RGB", (28, 28), colour).save(target / "images" / file)
    return target / source.name


def test_mmfinereason_rows_keep_the_image_and_the_answer(tmp_path):
    data = copy_fixture("mmfinereason", tmp_path)
    columns = json.loads(data.read_text().splitlines()[0]).keys()
    assert detect_image_format(list(columns)) == "mmfinereason"
    rows = load_rlsd_dataset(str(data), system_prompt=None)
    assert rows.column_names == ["prompt", "image", "solution"]
    assert rows["solution"] == ["7", "4"]  # the `answer` column, else the last \boxed{} of `solution`
    first = rows[0]
    assert first["prompt"][0]["role"] == "user" and "<image>" not in first["prompt"][0]["content"]
    assert first["prompt"][0]["content"].startswith("What is the sum of the two numbers")
    assert isinstance(first["image"], Image.Image) and first["image"].getpixel((0, 0)) == COLOURS["0.png"]


def test_a_parquet_file_with_an_image_feature(tmp_path):
    rows = [
        {"image": Image.new("RGB", (28, 28), colour), "question": f"Q{i}?", "answer": str(i)}
        for i, colour in enumerate(COLOURS.values())
    ]
    path = tmp_path / "data.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    converted = load_rlsd_dataset(str(path), dataset_format="mmfinereason")
    assert converted["solution"] == ["0", "1", "2"]
    assert [image.getpixel((0, 0)) for image in converted["image"]] == list(COLOURS.values())
    assert converted[0]["prompt"][0]["role"] == "system"


def test_mathvista_multiple_choice_is_lettered_and_free_form_kept(tmp_path):
    data = copy_fixture("mathvista", tmp_path)
    rows = load_rlsd_dataset(str(data), system_prompt=None, instruction="")
    assert rows["solution"] == ["B", "12"]
    choice = rows[0]["prompt"][-1]["content"]
    assert "(A) square\n(B) circle\n(C) triangle" in choice and CHOICE_INSTRUCTION in choice
    assert rows[1]["prompt"][-1]["content"] == "What is the value of x in the figure?"
    assert rows[1]["image"].getpixel((0, 0)) == COLOURS["2.png"]


def test_several_images_per_row(tmp_path):
    image = Image.new("RGB", (28, 28), (1, 2, 3))
    dataset = Dataset.from_list([{"images": [image, image], "question": "Same?", "answer": "yes"}])
    rows = to_rlsd_rows(dataset, "mmfinereason")
    assert rows.column_names == ["prompt", "images", "solution"] and len(rows[0]["images"]) == 2


def test_bad_image_rows_are_named(tmp_path):
    data = copy_fixture("mmfinereason", tmp_path)
    with pytest.raises(DatasetError, match=r"has no image column \(looked for 'image' or 'images'\)"):
        to_rlsd_rows(Dataset.from_list([{"question": "Q?", "answer": "1"}]), "mmfinereason", source="d.jsonl")
    (data.parent / "images" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"row 1 of .*train.jsonl, column 'image': names the image file .*1.png"):
        load_rlsd_dataset(str(data))
    (data.parent / "images" / "1.png").write_text("not a png")
    with pytest.raises(DatasetError, match=r"row 1 of .*column 'image': names the file .*1\.png .*does not open"):
        load_rlsd_dataset(str(data))
    empty = Dataset.from_list([{"image": None, "question": "Q?", "answer": "1"}, {"image": "x.png", "question": "Q?",
                                                                                "answer": "1"}])  # fmt: skip
    with pytest.raises(DatasetError, match=r"row 0 of the mmfinereason dataset, column 'image': has no image"):
        to_rlsd_rows(empty, "mmfinereason")


def test_a_huge_file_that_is_not_an_image_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 3 GB sparse file (no disk used) is refused naming the row and the file, after reading a few bytes only."""
    huge = tmp_path / "video.png"
    with huge.open("wb") as f:
        f.truncate(3 * 1024**3)
    read = {"bytes": 0}
    real_open = Path.open

    class CountingReader(io.FileIO):
        def readinto(self, buffer):
            count = super().readinto(buffer)
            read["bytes"] += count or 0
            return count

    def counting_open(self, mode="r", *args, **kwargs):
        if self == huge:
            return io.BufferedReader(CountingReader(str(self), "rb"))
        return real_open(self, mode, *args, **kwargs)

    def refuse_whole_read(self):
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(Path, "open", counting_open)
    monkeypatch.setattr(Path, "read_bytes", refuse_whole_read)
    dataset = Dataset.from_list([{"image": str(huge), "question": "Q?", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"row 0 of .*column 'image': names the file .*video\.png .*does not open"):
        to_rlsd_rows(dataset, "mmfinereason")
    assert read["bytes"] <= 1024**2, read


def test_an_image_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import rlsd.data.images as images

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", 10)
    with pytest.raises(DatasetError, match=r"row 0, column 'image': names the PNG image file .*a\.png of \d+ bytes"):
        images.load_image(str(tmp_path / "a.png"), "row 0, column 'image'")
    with pytest.raises(DatasetError, match=r"the image bytes of the cell is \d+ bytes, over the 10-byte limit"):
        images.load_image((tmp_path / "a.png").read_bytes(), "row 0")


def test_pil_decompression_bomb_limit_is_kept_and_named(tmp_path, monkeypatch):
    Image.new("RGB", (28, 28)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 784 pixels: more than twice the limit
    with pytest.raises(DatasetError, match=r"row 3, column 'image': names the file .*bomb\.png .*exceeds limit"):
        load_image(str(tmp_path / "bomb.png"), "row 3, column 'image'")
    with pytest.raises(DatasetError, match=r"row 3: the image bytes of the cell cannot be read.*exceeds limit"):
        load_image((tmp_path / "bomb.png").read_bytes(), "row 3")


def test_a_truncated_image_is_refused_at_load_naming_the_row_and_the_file(tmp_path):
    """PIL's verify() passes a truncated JPEG; it would fail only when the processor decodes it, mid-training."""
    Image.effect_noise((128, 128), 64).convert("RGB").save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 3 // 4])
    dataset = Dataset.from_list([{"image": str(tmp_path / "whole.jpg"), "question": "Q?", "answer": "1"},
                                 {"image": str(tmp_path / "cut.jpg"), "question": "Q?", "answer": "1"}])  # fmt: skip
    with pytest.raises(DatasetError, match=r"row 1 of .*column 'image': the image file .*cut\.jpg cannot be read"):
        to_rlsd_rows(dataset, "mmfinereason")


def test_a_choice_answer_outside_the_choices_is_refused(tmp_path):
    row = {"image": str(tmp_path / "a.png"), "question": "Which?", "choices": ["x", "y"], "answer": "z",
           "question_type": "multi_choice"}  # fmt: skip
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"column 'answer': 'z' is none of the choices \['x', 'y'\]"):
        to_rlsd_rows(Dataset.from_list([row]), "mathvista")


def test_a_model_folder_without_a_processor_is_refused(tiny_model_dir):
    with pytest.raises(DatasetError, match=r"has no processor for images \(AutoProcessor gave a"):
        load_processor(str(tiny_model_dir))


@pytest.fixture
def tiny_vl_dir(tmp_path):
    from rlsd.experiments.tiny_vlm import register_auto_processor, save_tiny_vl_model

    register_auto_processor()
    return save_tiny_vl_model(tmp_path / "tiny-vl")


def test_train_on_mmfinereason_then_eval_on_mathvista(tmp_path, tiny_vl_dir):
    from test_cli import TINY_OVERRIDES

    train_data = copy_fixture("mmfinereason", tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--config", str(ROOT / "recipes" / "qwen2.5-vl-7b-mmfinereason-rlsd.yaml"),
            "--model_name_or_path", str(tiny_vl_dir), "--dataset_name", str(train_data), "--output_dir", str(out),
            *TINY_OVERRIDES]  # fmt: skip
    assert cli_main(argv) == 0
    assert (out / "config.json").exists() and (out / "processor_config.json").exists()

    eval_data = copy_fixture("mathvista", tmp_path)
    eval_dir = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(out), "--dataset", str(eval_data), "--n", "2", "--max_new_tokens", "4",
                     "--output", str(eval_dir)]) == 0  # fmt: skip
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["n"] == 2
    generations = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["solution"] for g in generations] == ["B", "B", "12", "12"]


def test_eval_refuses_vllm_for_images(tmp_path, tiny_vl_dir):
    from rlsd.infra.validate import ConfigError

    eval_data = copy_fixture("mathvista", tmp_path)
    with pytest.raises(ConfigError, match=r"--backend vllm: is text-only in rlsd eval"):
        cli_main(["eval", "--model", str(tiny_vl_dir), "--dataset", str(eval_data), "--backend", "vllm",
                  "--output", str(tmp_path / "eval"), "--debug"])  # fmt: skip
