"""Dataset adapters: a source (hub name or local file) becomes rows with a conversational `prompt` and the
privileged answer column `solution`, the columns `RLSDTrainer` and the rewards read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from rlsd.gsm_symbolic import gsm_symbolic_rows, is_gsm_symbolic
from rlsd.image_data import IMAGE_FORMATS, detect_image_format, to_image_rows
from rlsd.rewards import last_boxed
from rlsd.validate import DatasetError, check_answer_length, check_dataset_file, looks_local, text_cell

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step inside <think> </think> tags."
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_DAPO_BODY_RE = re.compile(r"where \$Answer is the answer to the problem\.\s*(.*?)\s*Remember to put", re.DOTALL)


@dataclass(frozen=True)
class Adapter:
    """Which columns a format reads and how it gets the question and the final answer out of a row."""

    name: str
    required: tuple[str, ...]
    question: Callable[[dict[str, Any], str], str]
    answer: Callable[[dict[str, Any], str], str | None]
    """Both take the row and where it is (for errors naming its row and column)."""


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


def _math_answer(row: dict[str, Any], where: str) -> str | None:
    """MATH / MATH-500: the `answer` column when present, else the last `\\boxed{}` of the solution."""
    if row.get("answer") not in (None, ""):
        return text_cell(row, "answer", where, numbers=True)
    return last_boxed(text_cell(row, "solution", where))


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


def _column_answer(column: str) -> Callable[[dict[str, Any], str], str | None]:
    """A final answer read from one column: text or a number; null means no answer."""
    return lambda r, where: None if r.get(column) is None else text_cell(r, column, where, numbers=True)


def _column_question(column: str) -> Callable[[dict[str, Any], str], str]:
    """A question read from one column: non-empty text (a null is named, not turned into the prompt 'None')."""
    return lambda r, where: text_cell(r, column, where)


ADAPTERS: dict[str, Adapter] = {
    "gsm8k": Adapter("gsm8k", ("question", "answer"), _column_question("question"), _gsm8k_answer),
    "math": Adapter("math", ("problem", "solution"), _column_question("problem"), _math_answer),
    "dapo_math": Adapter("dapo_math", ("prompt", "reward_model"), _dapo_question, _dapo_answer),
    "deepmath": Adapter(
        "deepmath", ("question", "final_answer"), _column_question("question"), _column_answer("final_answer")
    ),
}
"""Known formats. `generic` is built from --prompt_column / --answer_column."""


def generic_adapter(prompt_column: str, answer_column: str) -> Adapter:
    """Any dataset with one question column and one final-answer column."""
    return Adapter(
        "generic", (prompt_column, answer_column), _column_question(prompt_column), _column_answer(answer_column)
    )


def detect_format(columns: list[str]) -> str:
    """The adapter whose columns a dataset has, most specific first; an error lists the columns present."""
    present = set(columns)
    for name in ("deepmath", "dapo_math", "gsm8k", "math"):
        if set(ADAPTERS[name].required) <= present:
            return name
    raise ValueError(
        f"cannot detect the dataset format from its columns {sorted(present)}; pass --dataset_format "
        f"({', '.join([*ADAPTERS, 'generic'])}), or --prompt_column and --answer_column"
    )


def load_source(name: str, config: str | None = None, split: str | None = None) -> Dataset | DatasetDict:
    """A local jsonl / json / parquet / csv file, or a hub dataset name, through `datasets.load_dataset`; a local
    file is checked first (`rlsd.validate.check_dataset_file`) and a load error names the file and its cause.
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
) -> Dataset:
    """Rows `{prompt: [system?, user], solution: answer}`; a row without an answer, a cell of the wrong type (a
    null question, a list answer) or an overlong final answer fails naming its row, column and `source`. An image
    format (`mmfinereason`, `mathvista`; given or detected from an image column) also keeps the row's images
    (`rlsd.image_data`; relative image paths are read from `base_dir`)."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    image_format = dataset_format if dataset_format in IMAGE_FORMATS else None
    if dataset_format is None and not (prompt_column or answer_column):
        image_format = detect_image_format(dataset.column_names)
    if image_format is not None:
        return to_image_rows(
            dataset, image_format, system_prompt=system_prompt, instruction=instruction, source=source,
            base_dir=base_dir,
        )  # fmt: skip
    adapter = _choose_adapter(dataset.column_names, dataset_format, prompt_column, answer_column)
    missing = [c for c in adapter.required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"format {adapter.name!r} needs column(s) {missing}; the dataset has {sorted(dataset.column_names)}"
        )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"row {index} of {source}" if source else f"row {index} of the {adapter.name} dataset"
        answer = adapter.answer(row, where)
        if answer is None or not str(answer).strip():
            raise DatasetError(
                f"row {index} of the {adapter.name} dataset" + (f" ({source})" if source else ""),
                "has no final answer",
                _no_answer_fix(adapter),
            )
        answer = check_answer_length(str(answer).strip(), where)
        user = f"{adapter.question(row, where).strip()}\n\n{instruction}".strip()
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return {"prompt": prompt, "solution": answer}

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


def _no_answer_fix(adapter: Adapter) -> str:
    """Where the adapter looks for the final answer, and the flags that point it elsewhere."""
    if adapter.name == "gsm8k":
        return (
            "the gsm8k format reads what follows '####' in column 'answer'; for plain answers pass "
            "--dataset_format generic --prompt_column question --answer_column answer"
        )
    return f"fill column(s) {list(adapter.required[1:])} or drop the row"


def _choose_adapter(
    columns: list[str], dataset_format: str | None, prompt_column: str | None, answer_column: str | None
) -> Adapter:
    """--dataset_format wins; then --prompt_column / --answer_column; else detection from the columns."""
    if dataset_format == "generic" or (dataset_format is None and (prompt_column or answer_column)):
        if not (prompt_column and answer_column):
            raise ValueError("the generic format needs both --prompt_column and --answer_column")
        return generic_adapter(prompt_column, answer_column)
    if dataset_format is not None:
        if dataset_format not in ADAPTERS:
            known = ", ".join([*ADAPTERS, "generic", *IMAGE_FORMATS])
            raise ValueError(f"unknown dataset format {dataset_format!r}; known: {known}")
        return ADAPTERS[dataset_format]
    return ADAPTERS[detect_format(columns)]


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
    )
