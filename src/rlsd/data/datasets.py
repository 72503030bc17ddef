"""Dataset adapters: a source (hub name or local file) becomes rows with a conversational `prompt` and the
privileged answer column `solution`, the columns `RLSDTrainer` and the rewards read.

A format is one row reader decorated with `@dataset_format(name, columns=..., detect=..., priority=..., help=...)`,
here or in any module imported before the data is loaded: detection, `--dataset_format` and its help follow."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from rlsd.data.formats import (
    FORMATS,
    GENERIC_HELP,
    KEPT_COLUMNS,
    DatasetFormat,
    chat_prompt,
    dataset_format,
    detection_order,
    format_names,
)
from rlsd.data.gsm_symbolic import gsm_symbolic_rows, is_gsm_symbolic
from rlsd.data.rewards import last_boxed
from rlsd.infra.validate import DatasetError, check_answer_length, check_dataset_file, looks_local, text_cell

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step inside <think> </think> tags."
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_DAPO_BODY_RE = re.compile(r"where \$Answer is the answer to the problem\.\s*(.*?)\s*Remember to put", re.DOTALL)


def _gsm8k_answer(row: dict[str, Any], where: str) -> str | None:
    """GSM8K: the final answer follows `####`, with thousands separators removed."""
    value = row.get("answer")
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise DatasetError(
            f"{where}, column 'answer'",
            f"holds the number {value!r}, but the gsm8k format reads the final answer after '####' in a text",
            "store the worked answer as text ending in '#### <answer>', or pass --dataset_format generic "
            "--prompt_column question --answer_column answer to use the number as the final answer",
        )
    if value is None:
        return None
    text = text_cell(row, "answer", where)
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else None


@dataset_format(
    "gsm8k", columns=("question", "answer"), priority=20, help="question, answer ending in '#### <answer>' (GSM8K)",
    no_answer_fix="the gsm8k format reads what follows '####' in column 'answer'; for plain answers pass "
    "--dataset_format generic --prompt_column question --answer_column answer",
)  # fmt: skip
def _gsm8k_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return text_cell(row, "question", where), _gsm8k_answer(row, where)


def _math_answer(row: dict[str, Any], where: str) -> str | None:
    """MATH / MATH-500: the `answer` column when present, else the last `\\boxed{}` of the solution."""
    if row.get("answer") not in (None, ""):
        return text_cell(row, "answer", where, numbers=True)
    return last_boxed(text_cell(row, "solution", where))


@dataset_format(
    "math", columns=("problem", "solution"), priority=10,
    help="problem, answer (else the last \\boxed{} of solution) (MATH, MATH-500)",
)  # fmt: skip
def _math_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return text_cell(row, "problem", where), _math_answer(row, where)


def _dapo_question(row: dict[str, Any], where: str) -> str:
    """DAPO-Math-17k: the problem inside the original instruction wrapper (or the plain prompt text)."""
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        text = text_cell(prompt[-1], "content", f"{where}, column 'prompt', last message")
    else:
        text = text_cell(row, "prompt", where)
    match = _DAPO_BODY_RE.search(text)
    return match.group(1) if match else text


def _dapo_answer(row: dict[str, Any], where: str) -> str | None:
    """DAPO-Math-17k: `reward_model.ground_truth`, else a `solution` column."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict):
        if reward_model.get("ground_truth") is None:
            return None
        return text_cell(reward_model, "ground_truth", f"{where}, column 'reward_model'", numbers=True)
    return None if row.get("solution") is None else text_cell(row, "solution", where, numbers=True)


@dataset_format(
    "dapo_math", columns=("prompt", "reward_model"), priority=30,
    help="prompt (its problem unwrapped), reward_model.ground_truth (DAPO-Math-17k)",
)  # fmt: skip
def _dapo_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return _dapo_question(row, where), _dapo_answer(row, where)


def _column_answer(column: str) -> Callable[[dict[str, Any], str], str | None]:
    """A final answer read from one column: text or a number; null means no answer."""
    return lambda r, where: None if r.get(column) is None else text_cell(r, column, where, numbers=True)


_deepmath_answer = _column_answer("final_answer")


@dataset_format(
    "deepmath", columns=("question", "final_answer"), priority=40, help="question, final_answer (DeepMath-103K)"
)
def _deepmath_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return text_cell(row, "question", where), _deepmath_answer(row, where)


def generic_format(prompt_column: str, answer_column: str) -> DatasetFormat:
    """Any dataset with one question column and one final-answer column (never detected: named by the flags)."""
    answer = _column_answer(answer_column)
    return DatasetFormat(
        "generic", lambda r, where: (text_cell(r, prompt_column, where), answer(r, where)),
        (prompt_column, answer_column), lambda columns: False, 0, GENERIC_HELP,
    )  # fmt: skip


def detect_format(columns: list[str]) -> str:
    """The first format (by priority) whose detector accepts the columns; an error lists the columns present."""
    found = next((fmt.name for fmt in detection_order() if fmt.detect(list(columns))), None)
    if found is None:
        raise ValueError(
            f"cannot detect the dataset format from its columns {sorted(set(columns))}; pass --dataset_format "
            f"({', '.join(format_names())}), or --prompt_column and --answer_column"
        )
    return found


def load_source(name: str, config: str | None = None, split: str | None = None) -> Dataset | DatasetDict:
    """A local jsonl / json / parquet / csv file, or a hub dataset name, through `datasets.load_dataset`; a local
    file is checked first (`rlsd.infra.validate.check_dataset_file`) and a load error names the file and its cause.
    `gsm_symbolic` (or a folder of its .toml templates) builds GSM-Symbolic rows, `config` holding its options."""
    if is_gsm_symbolic(name):
        return Dataset.from_list(gsm_symbolic_rows(name, config, split))
    path = Path(name)
    if path.suffix in LOCAL_FORMATS and not path.exists():
        raise FileNotFoundError(f"dataset file {name} does not exist")
    if path.is_file() or (path.suffix in LOCAL_FORMATS and looks_local(name)):
        check_dataset_file(path, LOCAL_FORMATS)
        try:
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")  # one split
        except Exception as err:
            cause = err.__cause__ or err
            raise DatasetError(
                name, f"cannot be loaded ({type(cause).__name__}: {cause})", "check the file's format"
            ) from err
    return load_dataset(name, name=config, split=split)


def to_rlsd_rows(
    dataset: Dataset,
    dataset_format: str | None = None,
    *,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = DEFAULT_INSTRUCTION,
    source: str | None = None,
    base_dir: Path | None = None,
    video_max_frames: int | None = None,
) -> Dataset:
    """Rows `{prompt: [system?, user], solution: answer}` (and `KEPT_COLUMNS`, as given) in the format given, else
    `generic` when a column flag is given, else the detected one; a row without an answer, a cell of the wrong type
    (a null question, a list answer) or an overlong final answer fails naming its row, column and `source`. An image
    format (registered with `images`, as in `rlsd.data.images`) also keeps the row's images (relative image paths are
    read from `base_dir`); a format with its own converter (the video format, `rlsd.data.videos`, its budget
    `video_max_frames`) runs it."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    fmt = _choose_format(dataset.column_names, dataset_format, prompt_column, answer_column)
    if fmt.convert is not None:
        options = {} if video_max_frames is None else {"max_frames": video_max_frames}
        return fmt.convert(dataset, fmt, system_prompt=system_prompt, instruction=instruction, source=source,
                           base_dir=base_dir, **options)  # fmt: skip
    if fmt.images:
        return image_data.to_image_rows(
            dataset, fmt, system_prompt=system_prompt, instruction=instruction, source=source, base_dir=base_dir
        )
    missing = [c for c in fmt.columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"format {fmt.name!r} needs column(s) {missing}; the dataset has {sorted(dataset.column_names)}"
        )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"row {index} of {source}" if source else f"row {index} of the {fmt.name} dataset"
        question, answer = fmt.read(row, where)
        if answer is None or not str(answer).strip():
            raise DatasetError(
                f"row {index} of the {fmt.name} dataset" + (f" ({source})" if source else ""),
                "has no final answer",
                fmt.no_answer_fix or f"fill column(s) {list(fmt.columns[1:])} or drop the row",
            )
        answer = check_answer_length(str(answer).strip(), where)
        return {"prompt": chat_prompt(question, system_prompt, instruction), "solution": answer}

    removed = [c for c in dataset.column_names if c not in KEPT_COLUMNS]
    return dataset.map(convert, with_indices=True, remove_columns=removed)


def _choose_format(
    columns: list[str], dataset_format: str | None, prompt_column: str | None, answer_column: str | None
) -> DatasetFormat:
    """--dataset_format wins; then --prompt_column / --answer_column; else detection from the columns."""
    if dataset_format == "generic" or (dataset_format is None and (prompt_column or answer_column)):
        if not (prompt_column and answer_column):
            raise ValueError("the generic format needs both --prompt_column and --answer_column")
        return generic_format(prompt_column, answer_column)
    name = detect_format(columns) if dataset_format is None else dataset_format
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; known: {', '.join(format_names())}")
    return FORMATS[name]


def load_rlsd_dataset(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    dataset_format: str | None = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = DEFAULT_INSTRUCTION,
    video_max_frames: int | None = None,
) -> Dataset:
    """`load_source` then `to_rlsd_rows`: the one entry point of `rlsd train` and `rlsd eval`."""
    source = load_source(name, config=config, split=split)
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"dataset {name} has no split {split!r}; it has {sorted(source)}")
        source = source[split]
    return to_rlsd_rows(
        source,
        dataset_format,
        prompt_column=prompt_column,
        answer_column=answer_column,
        system_prompt=system_prompt,
        instruction=instruction,
        source=name,
        base_dir=Path(name).parent if Path(name).is_file() else None,
        video_max_frames=video_max_frames,
    )


def load_cli_dataset(options: Any, name: str, split: str) -> Dataset:
    """`load_rlsd_dataset` with the dataset options `rlsd train` and `rlsd eval` share by name (`dataset_config`,
    `dataset_format`, `prompt_column`, `answer_column`, `system_prompt` ('' for none), `instruction`, and
    `video_max_frames` where the command has it)."""
    return load_rlsd_dataset(
        name,
        config=options.dataset_config,
        split=split,
        dataset_format=options.dataset_format,
        prompt_column=options.prompt_column,
        answer_column=options.answer_column,
        system_prompt=options.system_prompt or None,
        instruction=options.instruction,
        video_max_frames=getattr(options, "video_max_frames", None),
    )


# the image formats register themselves when `rlsd.data.images` is imported (it reads the registry in
# `rlsd.data.formats`)
from rlsd.data import images as image_data  # noqa: E402
from rlsd.data import videos as _videos  # noqa: E402, F401  (registers the easyvideor1 format)
