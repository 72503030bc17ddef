"""Dataset adapters: a source (hub name or local file) becomes rows with a conversational `prompt` and the
privileged answer column `solution`, the columns `RLSDTrainer` and the rewards read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from rlsd.rewards import last_boxed

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step inside <think> </think> tags."
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_DAPO_BODY_RE = re.compile(r"where \$Answer is the answer to the problem\.\s*(.*?)\s*Remember to put", re.DOTALL)


@dataclass(frozen=True)
class Adapter:
    """Which columns a format reads and how it gets the question and the final answer out of a row."""

    name: str
    required: tuple[str, ...]
    question: Callable[[dict[str, Any]], str]
    answer: Callable[[dict[str, Any]], str | None]


def _gsm8k_answer(row: dict[str, Any]) -> str | None:
    """GSM8K: the final answer follows `####`, with thousands separators removed."""
    text = str(row["answer"])
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else None


def _math_answer(row: dict[str, Any]) -> str | None:
    """MATH / MATH-500: the `answer` column when present, else the last `\\boxed{}` of the solution."""
    if row.get("answer") not in (None, ""):
        return str(row["answer"])
    return last_boxed(str(row["solution"]))


def _dapo_question(row: dict[str, Any]) -> str:
    """DAPO-Math-17k: the problem inside the original instruction wrapper (or the plain prompt text)."""
    prompt = row["prompt"]
    text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
    match = _DAPO_BODY_RE.search(text)
    return match.group(1) if match else text


def _dapo_answer(row: dict[str, Any]) -> str | None:
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict):
        return reward_model.get("ground_truth")
    return row.get("solution")


ADAPTERS: dict[str, Adapter] = {
    "gsm8k": Adapter("gsm8k", ("question", "answer"), lambda r: str(r["question"]), _gsm8k_answer),
    "math": Adapter("math", ("problem", "solution"), lambda r: str(r["problem"]), _math_answer),
    "dapo_math": Adapter("dapo_math", ("prompt", "reward_model"), _dapo_question, _dapo_answer),
    "deepmath": Adapter(
        "deepmath", ("question", "final_answer"), lambda r: str(r["question"]), lambda r: r["final_answer"]
    ),
}
"""Known formats. `generic` is built from --prompt_column / --answer_column."""


def generic_adapter(prompt_column: str, answer_column: str) -> Adapter:
    """Any dataset with one question column and one final-answer column."""
    return Adapter(
        "generic",
        (prompt_column, answer_column),
        lambda r: str(r[prompt_column]),
        lambda r: None if r[answer_column] is None else str(r[answer_column]),
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
    """A local jsonl / json / parquet / csv file, or a hub dataset name, through `datasets.load_dataset`."""
    path = Path(name)
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"dataset file {name} does not exist")
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")  # one split
    return load_dataset(name, name=config, split=split)


def to_rlsd_rows(
    dataset: Dataset,
    dataset_format: str | None = None,
    *,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = DEFAULT_INSTRUCTION,
) -> Dataset:
    """Rows `{prompt: [system?, user], solution: answer}`; a row without an answer fails naming its index."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    adapter = _choose_adapter(dataset.column_names, dataset_format, prompt_column, answer_column)
    missing = [c for c in adapter.required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"format {adapter.name!r} needs column(s) {missing}; the dataset has {sorted(dataset.column_names)}"
        )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        answer = adapter.answer(row)
        if answer is None or not str(answer).strip():
            raise ValueError(f"row {index} of the {adapter.name} dataset has no final answer")
        user = f"{adapter.question(row).strip()}\n\n{instruction}".strip()
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return {"prompt": prompt, "solution": str(answer).strip()}

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


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
            raise ValueError(f"unknown dataset format {dataset_format!r}; known: {', '.join([*ADAPTERS, 'generic'])}")
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
    )
