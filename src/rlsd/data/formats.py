"""The dataset-format registry: each format declares its reader, columns, detection and help in one place.

A format is one row reader decorated with `@dataset_format(...)` (the text formats in `rlsd.data.datasets`, the image
formats in `rlsd.data.images`, or the user's own module); detection, `--dataset_format` choices and help read this
registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Reader = Callable[[dict[str, Any], str], tuple[str, str | None]]
"""A format's row reader: (row, where it is for errors) -> (question, final answer or None)."""
Detector = Callable[[list[str]], bool]
"""A format's detection predicate over a dataset's column names."""


@dataclass(frozen=True)
class DatasetFormat:
    """A registered dataset format: the columns it needs, how it reads a row, when it is detected, and its help."""

    name: str
    read: Reader
    columns: tuple[str, ...]
    """Columns the format needs (the first holds the question); a forced format without them is refused."""
    detect: Detector
    priority: int
    """Detection order: a format of higher priority is tried first (ties: registration order)."""
    help: str
    images: tuple[str, ...] = ()
    """Candidate image columns (the first present is used); empty for a text format."""
    no_answer_fix: str | None = None
    """What to tell about a row without a final answer (default: fill its answer columns or drop it)."""
    convert: Callable[..., Any] | None = None
    """A whole-dataset converter `(dataset, fmt, *, system_prompt, instruction, source, base_dir, **options)` used
    instead of the text / image row paths (the video format, `rlsd.data.videos`)."""


KEPT_COLUMNS = ("teacher_box",)
"""Columns every format passes through unchanged (`rlsd.context.transforms.BOX_COLUMN`, the box transforms' box per
row), so that `rlsd train --teacher_transform crop_to_box` (or `draw_box`, `gaussian_mask`) finds them."""
FORMATS: dict[str, DatasetFormat] = {}
"""Every registered format by name (text here, images in `rlsd.data.images`); `generic` is built from the flags."""
GENERIC_HELP = "any question column and final-answer column, named by --prompt_column and --answer_column"


def has_columns(columns: tuple[str, ...], images: tuple[str, ...] = ()) -> Detector:
    """The default detector: the dataset has every one of `columns` and, for an image format, one of `images`."""
    return lambda present: set(columns) <= set(present) and (not images or bool(set(images) & set(present)))


def dataset_format(
    name: str,
    *,
    columns: tuple[str, ...],
    help: str,
    detect: Detector | None = None,
    priority: int = 0,
    images: tuple[str, ...] = (),
    no_answer_fix: str | None = None,
    convert: Callable[..., Any] | None = None,
) -> Callable[[Reader], Reader]:
    """Register the decorated row reader as format `name`: `--dataset_format name`, detected when `detect` (default:
    `has_columns(columns, images)`) holds before every format of lower priority, and listed with `help` by the CLI."""

    def register(read: Reader) -> Reader:
        if name in FORMATS or name == "generic":
            raise ValueError(f"dataset format {name!r} is already registered")
        detector = detect or has_columns(columns, images)
        FORMATS[name] = DatasetFormat(name, read, columns, detector, priority, help, images, no_answer_fix, convert)
        return read

    return register


def format_names() -> tuple[str, ...]:
    """Every format `--dataset_format` takes: the text formats, `generic`, then the image formats."""
    text = [name for name, fmt in FORMATS.items() if not fmt.images]
    return (*text, "generic", *(name for name, fmt in FORMATS.items() if fmt.images))


def format_help() -> str:
    """The `--dataset_format` help of `rlsd train` and `rlsd eval`, written from the registry ('%' escaped)."""
    helps = {name: f"{name}: {fmt.help}" + (" (images)" if fmt.images else "") for name, fmt in FORMATS.items()}
    entries = [helps.get(name, f"generic: {GENERIC_HELP}") for name in format_names()]
    return ("Dataset format, detected from the columns when not given. " + "; ".join(entries) + ".").replace("%", "%%")


def detection_order() -> list[DatasetFormat]:
    """The registered formats in the order detection tries them: highest priority first, then registration order."""
    return sorted(FORMATS.values(), key=lambda fmt: -fmt.priority)


def chat_prompt(question: str, system_prompt: str | None, instruction: str) -> list[dict[str, str]]:
    """A row's conversational prompt: the system turn (if any), then the question followed by the instruction."""
    user = f"{question.strip()}\n\n{instruction}".strip()
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
