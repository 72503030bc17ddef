"""Image datasets: MMFineReason-style training rows and MathVista-style evaluation rows become TRL 1.16's vision rows
(a conversational `prompt`, an `image` or `images` column, the final answer in `solution`), every image checked.

Column sets (what each format reads; both are registered with `rlsd.data.formats.dataset_format`):
- `mmfinereason`: `image` (or `images`), `question`, `answer` (else the final answer of `solution`). This is the
  schema of OpenDataArena's MMFineReason subsets (`image`, `question`, `answer` or `solution`,
  `qwen3vl_235b_thinking_response`, `data_source`, `id`). The card of `iieycx/rlsd-train-MMFineReason-123K` (the
  RLSD authors' training set) was not found: that it keeps these columns is an assumption, not a documented fact.
- `mathvista`: `decoded_image` (else `image`), `question`, `answer`, `question_type` (`multi_choice` or
  `free_form`) and `choices`, as in `AI4Math/MathVista`. A multiple-choice question lists its options as (A), (B),
  ... and its reference is the letter of the correct option; a free-form reference is the answer itself.

Images may be PIL images, `datasets` image cells (`{"bytes", "path"}`), raw bytes or file paths (relative paths are
taken from the dataset file's folder).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from rlsd.data.formats import KEPT_COLUMNS, DatasetFormat, chat_prompt, dataset_format, detection_order
from rlsd.data.rewards import last_boxed
from rlsd.infra.validate import DatasetError, check_answer_length, text_cell

CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_IMAGE_FILE_BYTES = 256 * 1024**2
"""The largest image file (or cell) accepted, checked before a file is read: far above any training image, far
below what reading a wrong file (a video, a model checkpoint) whole would cost."""
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError)
"""What PIL raises for a file that is not an image, a truncated or corrupt one, or one over its pixel limit."""


def _strip_placeholders(text: str) -> str:
    """A question without literal `<image>` / `<image N>` tags (the processor places the image itself)."""
    return re.sub(r"<image\s*\d*>", "", text).strip()


def _mmfinereason_answer(row: dict[str, Any], where: str) -> str | None:
    """`answer`, else the final answer of `solution` (its last `\\boxed{}` or `<answer>`, else the whole text)."""
    if row.get("answer") not in (None, ""):
        return text_cell(row, "answer", where, numbers=True)
    if row.get("solution") in (None, ""):
        return None
    text = text_cell(row, "solution", where, numbers=True)
    tagged = text.rsplit("<answer>", 1)[1].split("</answer>", 1)[0] if "<answer>" in text else None
    return last_boxed(text) or tagged or text


def _has_an_answer_or_solution(columns: list[str]) -> bool:
    """MMFineReason detection: an image column, a question, and an answer or a solution."""
    present = set(columns)
    return bool(present & {"image", "images"}) and "question" in present and bool(present & {"answer", "solution"})


@dataset_format(
    "mmfinereason", columns=("question",), images=("image", "images"), detect=_has_an_answer_or_solution,
    priority=50, help="image(s), question, answer (else the final answer of solution) (MMFineReason)",
)  # fmt: skip
def _mmfinereason_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return _strip_placeholders(text_cell(row, "question", where)), _mmfinereason_answer(row, where)


def _choices(row: dict[str, Any], where: str) -> list[str]:
    """The options of a multiple-choice row, as text; an error names the row when there are none."""
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices:
        raise DatasetError(
            f"{where}, column 'choices'", "is empty, but question_type is 'multi_choice'", "list the options"
        )
    if len(choices) > len(_LETTERS):
        raise DatasetError(f"{where}, column 'choices'", f"has {len(choices)} options", "26 at most")
    return [str(choice).strip() for choice in choices]


def _is_multi_choice(row: dict[str, Any]) -> bool:
    return str(row.get("question_type") or "").strip() == "multi_choice"


def _mathvista_question(row: dict[str, Any], where: str) -> str:
    """The question, with lettered options and an instruction to answer with a letter for multiple choice."""
    question = _strip_placeholders(text_cell(row, "question", where))
    if not _is_multi_choice(row):
        return question
    options = "\n".join(f"({_LETTERS[i]}) {choice}" for i, choice in enumerate(_choices(row, where)))
    return f"{question}\nChoices:\n{options}\n{CHOICE_INSTRUCTION}"


def _mathvista_answer(row: dict[str, Any], where: str) -> str | None:
    """The letter of the correct option for multiple choice (it must be one of the options), else the answer."""
    if row.get("answer") in (None, ""):
        return None
    answer = text_cell(row, "answer", where, numbers=True).strip()
    if not _is_multi_choice(row):
        return answer
    choices = _choices(row, where)
    if answer in choices:
        return _LETTERS[choices.index(answer)]
    if len(answer) == 1 and answer.upper() in _LETTERS[: len(choices)]:
        return answer.upper()
    raise DatasetError(
        f"{where}, column 'answer'", f"{answer!r} is none of the choices {choices}", "fix the answer or the choices"
    )


@dataset_format(
    "mathvista", columns=("question", "answer", "question_type"), images=("decoded_image", "image"), priority=60,
    help="decoded_image (else image), question, answer, question_type, choices (MathVista)",
)  # fmt: skip
def _mathvista_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return _mathvista_question(row, where), _mathvista_answer(row, where)


def image_column(columns: list[str], fmt: DatasetFormat) -> str | None:
    """The first of the format's image columns the dataset has."""
    return next((c for c in fmt.images if c in columns), None)


def detect_image_format(columns: list[str]) -> str | None:
    """The image format detected from a dataset's columns (as `rlsd.data.datasets.detect_format` would); None
    otherwise."""
    return next((fmt.name for fmt in detection_order() if fmt.images and fmt.detect(list(columns))), None)


def load_image(value: Any, where: str, base_dir: Path | None = None) -> dict[str, Any]:
    """One image cell as a `datasets` image cell `{"bytes", "path"}`, after checking that it opens and decodes as
    an image; a missing cell, a missing file, a file that is not an image or is too large, or unreadable bytes fail
    naming `where` and the file. A file's format is checked from its header and its size against
    MAX_IMAGE_FILE_BYTES before it is read, so a huge file that is not an image is never read whole."""
    if value is None:
        raise DatasetError(where, "has no image", "fill the image or drop the row")
    if isinstance(value, PILImage.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() or base_dir is None else base_dir / value
        if not path.is_file():
            raise DatasetError(where, f"names the image file {path}, which does not exist", "check the path")
        data, name = read_image_file(path, where), str(path)
    elif isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        data, name = value["bytes"], value.get("path")
    elif isinstance(value, bytes):
        data, name = value, None
    else:
        raise DatasetError(where, f"holds a {type(value).__name__}, not an image", "store an image, bytes or a path")
    label = f"the image file {name}" if name else "the image bytes of the cell"
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise DatasetError(where, f"{label} is {len(data)} bytes, over the {MAX_IMAGE_FILE_BYTES}-byte limit",
                           "shrink or re-encode the image")  # fmt: skip
    check_decodes(data, where, label)
    return {"bytes": data, "path": name}


def read_image_file(path: Path, where: str) -> bytes:
    """The bytes of an image file, read only after PIL identified its format from the header (PIL's `open` is
    lazy) and its size is within MAX_IMAGE_FILE_BYTES; PIL's decompression-bomb limit applies to the header's
    dimensions. An error names `where` and the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            with PILImage.open(f) as image:  # reads the header only
                image_format = image.format
        except _IMAGE_ERRORS as err:
            raise DatasetError(
                where, f"names the file {path} ({size} bytes), which does not open as an image: {err}",
                "replace or drop the image",
            ) from err  # fmt: skip
        if size > MAX_IMAGE_FILE_BYTES:
            raise DatasetError(
                where, f"names the {image_format} image file {path} of {size} bytes, over the "
                f"{MAX_IMAGE_FILE_BYTES}-byte limit", "shrink or re-encode the image",
            )  # fmt: skip
        f.seek(0)
        data = f.read(MAX_IMAGE_FILE_BYTES + 1)  # bounded even if the file grew since stat
    return data


def check_decodes(data: bytes, where: str, label: str) -> None:
    """The bytes open, verify and decode as an image (PIL's `verify` checks little beyond PNG checksums, so a
    truncated JPEG passes it: decoding here fails it now, naming the row and the file, not later in training)."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.verify()
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
    except _IMAGE_ERRORS as err:
        raise DatasetError(where, f"{label} cannot be read as an image: {err}", "replace or drop the image") from err


def to_image_rows(
    dataset: Dataset,
    fmt: DatasetFormat,
    *,
    system_prompt: str | None,
    instruction: str,
    source: str | None = None,
    base_dir: Path | None = None,
) -> Dataset:
    """TRL vision rows `{prompt: [system?, user], image | images, solution}` (and `KEPT_COLUMNS`, as given); a missing
    image column, an unreadable image, a row without an answer or a cell of the wrong type fails naming its row and
    column and `source`."""
    column = image_column(dataset.column_names, fmt)
    if column is None:
        raise DatasetError(
            source or f"the {fmt.name} dataset",
            f"has no image column (looked for {' or '.join(repr(c) for c in fmt.images)}); its columns "
            f"are {sorted(dataset.column_names)}",
            "add the images, or choose a text format with --dataset_format",
        )
    missing = [c for c in fmt.columns if c not in dataset.column_names]
    if missing:
        raise DatasetError(
            source or f"the {fmt.name} dataset",
            f"format {fmt.name!r} needs column(s) {missing}; the dataset has {sorted(dataset.column_names)}",
        )
    if isinstance(dataset.features.get(column), Image) or _is_image_list(dataset.features.get(column)):
        dataset = dataset.cast_column(column, _undecoded(dataset.features[column]))
    several = column == "images" or isinstance(dataset.features.get(column), List)
    target = "images" if several else "image"

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"row {index} of {source}" if source else f"row {index} of the {fmt.name} dataset"
        question, answer = fmt.read(row, where)
        if answer is None or not str(answer).strip():
            raise DatasetError(where, "has no final answer", "fill the answer or drop the row")
        answer = check_answer_length(str(answer).strip(), where)
        cell = f"{where}, column {column!r}"
        if several:
            cells = row[column] if isinstance(row[column], list) else [row[column]]
            if not cells:
                raise DatasetError(cell, "has no image", "fill the images or drop the row")
            images: Any = [load_image(value, f"{cell}, image {i}", base_dir) for i, value in enumerate(cells)]
        else:
            images = load_image(row[column], cell, base_dir)
        return {"prompt": chat_prompt(question, system_prompt, instruction), target: images, "solution": answer}

    outputs = {target: List(Image()) if several else Image(), "solution": Value("string")}
    return map_vision_rows(dataset, convert, outputs)


def map_vision_rows(dataset: Dataset, convert: Callable[..., dict[str, Any]], outputs: dict[str, Any]) -> Dataset:
    """`dataset.map(convert, with_indices=True)` into rows `{prompt, **outputs}` plus the `KEPT_COLUMNS` present, every
    other column dropped: the one row mapping of the image and video formats (`rlsd.data.videos`)."""
    message = {"role": Value("string"), "content": Value("string")}
    kept = [c for c in KEPT_COLUMNS if c in dataset.column_names]  # passed through (the box transforms' boxes)
    features = Features({"prompt": List(message), **outputs, **{c: dataset.features[c] for c in kept}})
    removed = [c for c in dataset.column_names if c not in kept]
    # `datasets` keys its map cache on the dataset file, not on the image files rows name: read (and check) them
    # again on every load, or re-extracted frames or a replaced image would be skipped (tests/test_media_reload.py)
    return dataset.map(
        convert, with_indices=True, remove_columns=removed, features=features, load_from_cache_file=False
    )


def _is_image_list(feature: Any) -> bool:
    return isinstance(feature, List) and isinstance(feature.feature, Image)


def _undecoded(feature: Any) -> Any:
    """The same image feature without decoding, so that cells arrive as `{"bytes", "path"}` to be checked."""
    return List(Image(decode=False)) if _is_image_list(feature) else Image(decode=False)


def load_processor(model: str) -> Any:
    """The model's processor (`AutoProcessor`), refused with a clear error when the folder has none (AutoProcessor
    then falls back to the tokenizer, and the images would never reach the model)."""
    from transformers import AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ImportError, ValueError) as err:
        raise DatasetError(
            f"model {model}", f"has no loadable processor ({type(err).__name__}: {err})",
            "an image dataset needs the model's processor saved beside it (processor.save_pretrained)",
        ) from err  # fmt: skip
    if not isinstance(processor, ProcessorMixin):
        raise DatasetError(
            f"model {model}",
            f"has no processor for images (AutoProcessor gave a {type(processor).__name__})",
            "use a vision-language model and save its processor with it (processor.save_pretrained)",
        )
    return processor
