"""One validation layer for what a user hands in: dataset files and cells, knobs, CLI arguments, model and output
folders. Every check runs before any expensive work and raises errors of one style: where (file, line, row,
column or flag), what is wrong, and how to fix it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any

MAX_ANSWER_CHARS = 1000
"""Longest final answer accepted from a dataset: a final answer is a short expression, and a longer one would
reach the verifier and its log in full (a 5 MB answer ran a run out of memory)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any one of these in a model folder means its tokenizer was saved with it."""
RUN_FILES = (
    "trainer_state.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "config.json",
)
"""Files whose presence in an output folder means that a run already wrote there."""


def describe(where: str, what: str, fix: str = "") -> str:
    """The one message style: `where: what; fix`."""
    return f"{where}: {what}" + (f"; {fix}" if fix else "")


class _NamedError(Exception):
    """An error of the one message style, carrying its three parts."""

    def __init__(self, where: str, what: str, fix: str = "") -> None:
        self.where, self.what, self.fix = where, what, fix
        super().__init__(describe(where, what, fix))

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable (dataset workers, multiprocessing) despite the keyword-free three-part constructor."""
        return (type(self), (self.where, self.what, self.fix))


class InputError(_NamedError, ValueError):
    """A bad input, named: where it is (file, line, row, column or flag), what is wrong and how to fix it."""


class DatasetError(InputError):
    """A dataset file or cell that cannot be used as it is."""


class ConfigError(InputError):
    """A knob or command-line argument out of its range."""


class ModelFolderError(InputError):
    """A local model folder that is missing or incomplete."""


class OutputDirError(InputError):
    """An output folder that already holds another run (or is a file)."""


class CheckpointError(InputError):
    """A checkpoint that is incomplete, torn or unreadable, refused before resuming from it."""


# ------------------------------------------------------------------------------------------------ dataset files
def check_dataset_file(path: Path, formats: dict[str, str]) -> None:
    """Refuse a local dataset file that `datasets` would fail on obscurely: unsupported, empty, not UTF-8,
    malformed JSON (line and column), or a CSV row whose field count differs from the header's."""
    if path.is_dir():
        raise DatasetError(str(path), "is a folder", f"pass one file ({', '.join(formats)})")
    if path.suffix not in formats:
        raise DatasetError(
            str(path), f"unsupported file type {path.suffix or '(no extension)'!r}", f"use {', '.join(formats)}"
        )
    if path.stat().st_size == 0:
        raise DatasetError(str(path), "the file is empty", "write at least one row")
    checker = {".jsonl": _check_json_lines, ".json": _check_json, ".csv": _check_csv, ".parquet": _check_parquet}
    checker[path.suffix](path)


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text of `data`; a bad byte is named by its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(
            f"{path} line {line} column {column}",
            f"byte 0x{data[err.start]:02x} is not UTF-8",
            "re-save the file as UTF-8",
        ) from None


def _check_json_lines(path: Path) -> None:
    """One JSON object per non-blank line."""
    rows = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            text = _decode(path, raw, number)
            if not text.strip():
                continue
            _check_json_row(path, number, text)
            rows += 1
    if rows == 0:
        raise DatasetError(str(path), "the file has no rows (only blank lines)", "write at least one JSON object")


def _check_json_row(path: Path, number: int, text: str) -> None:
    """One line of a JSON-lines file parses to an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path} line {number} column {err.colno}", f"malformed JSON ({err.msg})", "fix or remove the line"
        ) from None
    if not isinstance(value, dict):
        raise DatasetError(
            f"{path} line {number}", f"a JSON {type(value).__name__}, not an object", "write one object per line"
        )


def _check_json(path: Path) -> None:
    """A JSON array of objects (or an object of columns); a file that is not one is checked as JSON lines."""
    text = _decode(path, path.read_bytes())
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        _check_json_lines(path)
        return
    if isinstance(value, list):
        if not value:
            raise DatasetError(str(path), "the JSON array is empty", "write at least one row")
        bad = next((i for i, row in enumerate(value) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DatasetError(f"{path} row {bad}", f"a JSON {type(value[bad]).__name__}, not an object")
    elif not isinstance(value, dict):
        raise DatasetError(str(path), f"a JSON {type(value).__name__}", "write an array of objects or JSON lines")


def _check_csv(path: Path) -> None:
    """Every row has as many fields as the header (pandas would silently turn extra leading fields into an index,
    cutting a question with unquoted commas to its last field)."""
    reader = csv.reader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    header = next(reader, None)
    rows = 0
    for row in reader:
        if not row:
            continue
        rows += 1
        if len(row) != len(header):
            raise DatasetError(
                f"{path} line {reader.line_num}",
                f"{len(row)} fields, but the header has {len(header)} ({', '.join(header)})",
                'quote fields that contain commas ("a, b") or use .jsonl',
            )
    if rows == 0:
        raise DatasetError(str(path), "the file has a header but no rows", "write at least one row")


def _check_parquet(path: Path) -> None:
    """A readable Parquet file with at least one row."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise DatasetError(str(path), f"is not a readable Parquet file ({err})", "re-write it") from None
    if rows == 0:
        raise DatasetError(str(path), "the Parquet file has no rows", "write at least one row")


# ------------------------------------------------------------------------------------------------ dataset cells
def text_cell(row: dict[str, Any], column: str, where: str, *, numbers: bool = False) -> str:
    """The text of `row[column]`: a non-empty string (or, with `numbers`, a finite number); anything else, such as
    a null, a list or a dict, is named with its row and column instead of being turned into text by `str()`."""
    value = row.get(column)
    place = f"{where}, column {column!r}"
    if value is None:
        raise DatasetError(place, "is null", "fill the cell or drop the row")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        kind = type(value).__name__
        raise DatasetError(place, f"holds a {kind} ({_preview(value)}), not text", "store one plain string per cell")
    if not isinstance(value, str):
        if not numbers:
            raise DatasetError(place, f"holds a number ({value!r}), not text", "store it as a string")
        if not math.isfinite(value):
            raise DatasetError(place, f"holds {value!r}", "store a finite answer")
        value = str(value)
    if not value.strip():
        raise DatasetError(place, "is empty", "fill the cell or drop the row")
    return value


def check_answer_length(answer: str, where: str) -> str:
    """A final answer short enough for the verifier and its log."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise DatasetError(
            where,
            f"the final answer is {len(answer):,} characters long (at most {MAX_ANSWER_CHARS:,} are accepted)",
            "a final answer is a short expression: check the answer column, or drop the row",
        )
    return answer


def _preview(value: Any, limit: int = 40) -> str:
    """A short repr for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ knobs and flags
def check_finite_floats(config: Any) -> None:
    """Every float field of a dataclass config is finite: a NaN or inf knob is named by its flag at construction
    instead of producing a NaN model or a sampling error many steps later."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{spec.name}", f"must be a finite number, got {value}", "pass a finite value")


def check_positive(values: dict[str, int | float | None]) -> None:
    """Each named argument (a flag name mapped to its value; None is skipped) is a finite number >= 1."""
    for flag, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 1):
            raise ConfigError(flag, f"must be >= 1, got {value}", "pass a positive value")


# ------------------------------------------------------------------------------------------------ folders
def looks_local(name: str) -> bool:
    """Whether a model or dataset name can only be a local path (hub ids are `name` or `owner/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") >= 2 or "\\" in name or Path(name).exists()


def is_hub_id(name: str) -> bool:
    """Whether `name` is a valid hub repository id (`owner/name` or `name`, as `huggingface_hub` validates it)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_folder(name: str, flag: str = "") -> None:
    """A local model folder exists, holds a config and its tokenizer (transformers would otherwise report a bad
    hub id, or build an empty tokenizer); hub names pass through. With `flag` (`--teacher_model`: a teacher, whose
    tokenizer is optional) the errors name the flag. A name that cannot be a hub id (`teacher/`, `my teacher`) is a
    local path."""
    if not looks_local(name) and is_hub_id(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        if flag:
            raise ModelFolderError(f"{flag} folder {name}", "does not exist" if not path.exists() else "is a file",
                                   "check the path, or pass a hub name such as Qwen/Qwen3-0.6B")  # fmt: skip
        raise ModelFolderError(
            f"model {name}", "no such local folder", "check the path, or pass a hub name such as Qwen/Qwen3-0.6B"
        )
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise ModelFolderError(
            f"{flag} folder {name}" if flag else f"model folder {name}",
            "has no config.json",
            "save the model there with model.save_pretrained(folder)",
        )
    if flag:
        return
    if not any((path / file).exists() for file in TOKENIZER_FILES):
        raise ModelFolderError(
            f"model folder {name}",
            f"has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})",
            "save the tokenizer there too with tokenizer.save_pretrained(folder)",
        )


def run_files_in(folder: Path) -> list[str]:
    """The files and checkpoint folders of a previous run found in `folder` (empty when there are none)."""
    if not folder.is_dir():
        return []
    names = sorted(os.listdir(folder))
    checkpoints = [n for n in names if n.startswith("checkpoint-") or n.startswith(".rlsd-partial-")]
    return checkpoints + [n for n in names if n in RUN_FILES]


def check_output_dir(folder: str, *, resuming: bool, overwrite: bool, overwrite_flag: str) -> list[str]:
    """Refuse an output folder that is a file, or that holds another run unless the run resumes or overwriting was
    asked for; returns the previous run's entries (which an overwrite removes)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {folder}", "is a file", "choose another folder")
    found = run_files_in(path)
    if found and not resuming and not overwrite:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise OutputDirError(
            f"output folder {folder}",
            f"already holds a run ({shown})",
            f"resume it with --resume_from_checkpoint true, replace it with {overwrite_flag} true, "
            "or choose another folder",
        )
    return found


# ------------------------------------------------------------------------------------------------ runtime
class RewardError(RuntimeError):
    """A reward function that raised, hung past its time bound, or returned something that is not a list of
    finite rewards (None for not applicable), named."""

    def __init__(self, name: str, what: str, fix: str = "") -> None:
        self.name, self.what, self.fix = name, what, fix
        super().__init__(f"reward function {name!r} {what}" + (f"; {fix}" if fix else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable despite the three-part constructor."""
        return (type(self), (self.name, self.what, self.fix))


class NonFiniteError(_NamedError, RuntimeError):
    """A NaN or inf loss, gradient or advantage: training stops at that step, before anything is saved."""
