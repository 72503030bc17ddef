"""The dataset-format registry: a format registered by code outside `rlsd.data.datasets` with `@dataset_format` is
detected ahead of lower priorities, converted by `load_rlsd_dataset`, and offered by `rlsd train` and `rlsd eval`; the
built-in text and image formats keep their names and detection order."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from rlsd.commands import evaluate, train
from rlsd.data.datasets import detect_format, load_cli_dataset, load_rlsd_dataset, to_rlsd_rows
from rlsd.data.formats import FORMATS, dataset_format, format_names
from rlsd.infra.validate import text_cell

GRADED = [
    {"question": "What is 2 + 3?", "answer": "5", "grader": "exact"},
    {"question": "What is 4 * 4?", "answer": "16", "grader": "exact"},
]
"""GSM8K's columns plus `grader`, with plain answers (no '####'): gsm8k would find no final answer in them."""
COLUMNS = ["answer", "grader", "question"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def graded_qa() -> Iterator[str]:
    """A format registered from test code, ranked above gsm8k (20), and removed again afterwards."""

    @dataset_format(
        "graded_qa", columns=("question", "answer", "grader"), priority=25, help="question, plain answer (100% test)"
    )
    def read(row: dict[str, Any], where: str) -> tuple[str, str | None]:
        return text_cell(row, "question", where), text_cell(row, "answer", where, numbers=True)

    yield "graded_qa"
    del FORMATS["graded_qa"]


def test_without_the_registered_format_the_rows_are_read_as_gsm8k():
    assert "graded_qa" not in FORMATS
    assert detect_format(COLUMNS) == "gsm8k"
    with pytest.raises(ValueError, match="row 0 of the gsm8k dataset: has no final answer"):
        to_rlsd_rows(Dataset.from_list(GRADED))


def test_a_registered_format_is_detected_by_priority_and_loaded(graded_qa, tmp_path):
    assert detect_format(COLUMNS) == graded_qa
    assert detect_format(["question", "answer"]) == "gsm8k"  # its detector still needs `grader`
    rows = load_rlsd_dataset(str(write_jsonl(tmp_path / "graded.jsonl", GRADED)), system_prompt=None)
    assert rows["solution"] == ["5", "16"]
    assert rows[0]["prompt"][0]["content"].startswith("What is 2 + 3?\n\n")
    assert graded_qa in format_names() and format_names().index("generic") == format_names().index(graded_qa) + 1


def test_train_and_eval_offer_the_registered_format(graded_qa, tmp_path):
    eval_parser = evaluate.make_parser()
    eval_argv = ["--model", "m", "--dataset", "d.jsonl", "--output", str(tmp_path / "eval")]
    assert eval_parser.parse_args([*eval_argv, "--dataset_format", graded_qa]).dataset_format == graded_qa
    train_parser = train.make_parser()
    train_argv = ["--dataset_name", "d.jsonl", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
                  "--bf16", "false", "--report_to", "none"]  # fmt: skip
    script_args, _, _ = train_parser.parse_args_and_config(args=[*train_argv, "--dataset_format", graded_qa])
    assert script_args.dataset_format == graded_qa
    for parser in (eval_parser, train_parser):
        assert "graded_qa: question, plain answer (100% test)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        eval_parser.parse_args([*eval_argv, "--dataset_format", "graded"])
    with pytest.raises(SystemExit):
        train_parser.parse_args_and_config(args=[*train_argv, "--dataset_format", "graded"])


def test_a_format_name_is_registered_once():
    def read(row: dict[str, Any], where: str) -> tuple[str, str | None]:
        return "q", "a"

    for name in ("gsm8k", "generic", "mathvista"):
        with pytest.raises(ValueError, match=f"dataset format '{name}' is already registered"):
            dataset_format(name, columns=("q",), help="dup")(read)
    assert FORMATS["gsm8k"].columns == ("question", "answer")


def test_built_in_formats_keep_their_names_and_detection_order():
    assert format_names() == (
        "gsm8k", "math", "dapo_math", "deepmath", "generic", "mmfinereason", "mathvista", "easyvideor1"
    )  # fmt: skip
    assert detect_format(["problem", "answer", "videos", "problem_type"]) == "easyvideor1"  # not math
    assert FORMATS["mathvista"].images == ("decoded_image", "image") and not FORMATS["math"].images
    mathvista = ["pid", "question", "image", "decoded_image", "choices", "question_type", "answer"]
    assert detect_format(mathvista) == "mathvista"  # also has MMFineReason's columns: the higher priority wins
    assert detect_format(["image", "question", "answer"]) == "mmfinereason"  # not gsm8k
    assert detect_format(["image", "question", "final_answer"]) == "deepmath"  # no answer / solution: text
    with pytest.raises(ValueError, match=r"--dataset_format \(gsm8k, math, .*, mathvista, easyvideor1\)"):
        detect_format(["title"])


def test_train_and_eval_share_one_dataset_loader(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is 5 squared?", "a": 25}])
    options = argparse.Namespace(
        dataset_config=None, dataset_format=None, prompt_column="q", answer_column="a", system_prompt="",
        instruction="Box it.",
    )  # fmt: skip
    rows = load_cli_dataset(options, str(path), "train")
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 5 squared?\n\nBox it."}]  # '' means no system
    assert rows["solution"] == ["25"]
