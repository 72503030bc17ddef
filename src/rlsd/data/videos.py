"""EasyVideoR1-format video data: rows of `problem`, `answer` and `videos` become TRL vision rows whose video frames
are images (`prompt`, `images`, `solution`, `problem_type`), every frame checked before any training step.

Fields read, from EasyVideoR1's own files (github.com/cyuQ1n/EasyVideoR1: `examples/video_rl/video_rl.yaml`,
`docs/config_parameters.md`, `examples/video_rl/reward_function/video_reward.py`):
- `problem` (its `data.prompt_key`), the question;
- `answer` (`data.answer_key`), the reference, possibly wrapped in `<answer>...</answer>` (unwrapped here); a Video-R1
  style `solution` is read when there is no `answer`;
- `videos` (`data.video_key`), a list of videos per row;
- `problem_type` (`video_reward.py` scores `multiple choice`, `numerical`, `temporal grounding`, `spatial-temporal
  grounding`, `open-ended`; its unified pipeline adds reward modules `ocr`, `boolean`, `math_task`, `code_task`,
  `grounding`), kept as a column for the rewards; `data_type` (`video` or `image`, not read: every row must have a
  video); Video-R1's `options` (`["A. ...", ...]`, the format EasyVideoR1 builds on), appended to the question.
- Frame budgets are *run* settings there, not row fields: `data.video_fps` (2.0), `data.video_max_frames` (128),
  `data.min_pixels` / `max_pixels` / `video_max_pixels` (the processor's pixel limits). Here the frame budget is
  `--video_max_frames` (default 128, as EasyVideoR1's); pixel limits stay the processor's own.

Frames, not video input: TRL 1.16's `GRPOTrainer` reads only `prompt`, `image` and `images` columns (its
`_signature_columns`) and puts only `{"type": "image"}` parts in the prompt, so a row's video reaches the model as its
frames given as images (Qwen2-VL's image path, one image per frame, no temporal patching). No video decoder (PyAV,
decord, torchvision.io, OpenCV) is a dependency: a video is a folder of frame images (sorted by file name) or a list
of frame image paths, extracted beforehand at the rate wanted (EasyVideoR1's `video_fps`), e.g.
`ffmpeg -i clip.mp4 -vf fps=2 clip/%05d.jpg`. A video file is refused naming that command. EasyVideoR1's
preprocessed `.pt` frame caches are not read.

Rewards: `multiple choice` (a letter) and `numerical` map to `math_accuracy` (math-verify equality; EasyVideoR1
rounds numbers to 2 decimals, math-verify compares them as written, so 3.499 is not 3.5), integer counts also to
`integer_match`; `math` to `math_accuracy`; OCR, `open-ended` (ROUGE there), `boolean`, `code`, and the grounding types
(temporal / spatial IoU) have no built-in reward here (nor has a regression type, which EasyVideoR1's files do not
name): pass your own with `--reward_funcs path/to/file.fn` (it receives `problem_type` and `solution`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datasets import Dataset, Image, List, Value

from rlsd.data.formats import DatasetFormat, chat_prompt, dataset_format
from rlsd.data.images import load_image, map_vision_rows
from rlsd.infra.validate import DatasetError, check_answer_length, text_cell

DEFAULT_MAX_FRAMES = 128
"""EasyVideoR1's `data.video_max_frames` default: the most frames one row's videos may hold together."""
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""The frame image files a video folder may hold."""
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".gif", ".pt")
"""Files refused as videos: no decoder is a dependency (and EasyVideoR1's `.pt` caches are not read)."""
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def _has_videos(columns: list[str]) -> bool:
    """EasyVideoR1 detection: `problem`, `videos`, and an `answer` or a `solution`."""
    present = set(columns)
    return {"problem", "videos"} <= present and bool(present & {"answer", "solution"})


def _answer(row: dict[str, Any], where: str) -> str | None:
    """`answer` (else `solution`), unwrapped from `<answer>...</answer>` as EasyVideoR1's reward does."""
    column = "answer" if row.get("answer") not in (None, "") else "solution"
    if row.get(column) in (None, ""):
        return None
    text = text_cell(row, column, where, numbers=True)
    match = _ANSWER_TAG.search(text)
    return match.group(1) if match else text


def _question(row: dict[str, Any], where: str) -> str:
    """`problem` without `<video>` / `<image>` placeholders, followed by Video-R1-style `options` when present."""
    question = re.sub(r"<(video|image)\s*\d*>", "", text_cell(row, "problem", where)).strip()
    options = row.get("options")
    if options:
        if not isinstance(options, list):
            raise DatasetError(f"{where}, column 'options'", f"holds a {type(options).__name__}", "list the options")
        question += "\n" + "\n".join(str(option).strip() for option in options)
    return question


def _easyvideor1_row(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    return _question(row, where), _answer(row, where)


def video_frames(entry: Any, where: str, base_dir: Path | None) -> list[Any]:
    """One video's frames (image cells): a folder of frame images sorted by name, or a list of frame paths; a video
    file, a missing folder, a folder with other files, or no frames fail naming `where`."""
    if isinstance(entry, list):
        return [load_image(value, f"{where}, frame {i}", base_dir) for i, value in enumerate(entry)]
    if not isinstance(entry, str):
        raise DatasetError(where, f"holds a {type(entry).__name__}", "give a frame folder or a list of frame paths")
    path = Path(entry) if Path(entry).is_absolute() or base_dir is None else base_dir / entry
    if path.suffix.lower() in VIDEO_SUFFIXES or path.is_file():
        raise DatasetError(
            where, f"names the video file {path}, which is not decoded here (no video decoder is a dependency)",
            f"extract its frames first, e.g. `ffmpeg -i {path} -vf fps=2 {path.with_suffix('')}/%05d.jpg`, and "
            "name the folder (or the list of frame files) in `videos`",
        )  # fmt: skip
    if not path.is_dir():
        raise DatasetError(where, f"names the frame folder {path}, which does not exist", "check the path")
    files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in FRAME_SUFFIXES]
    if others:
        raise DatasetError(where, f"the frame folder {path} holds files that are not frames: {others[:3]}",
                           f"keep only {'/'.join(FRAME_SUFFIXES)} frames there")  # fmt: skip
    return [load_image(str(p), f"{where}, frame {p.name}", None) for p in files]


def _row_videos(row: dict[str, Any], where: str, base_dir: Path | None, max_frames: int) -> list[Any]:
    """Every frame of a row's videos, in order; a video with no frames or a row over `max_frames` fails naming it."""
    videos = row["videos"] if isinstance(row["videos"], list) else [row["videos"]]
    frames: list[Any] = []
    for index, entry in enumerate(videos):
        found = video_frames(entry, f"{where}, column 'videos', video {index}", base_dir)
        if not found:
            raise DatasetError(f"{where}, column 'videos', video {index}", "has no frames",
                               "extract its frames or drop the row")  # fmt: skip
        frames += found
    _check_budget(len(frames), max_frames, f"{where}, column 'videos'")
    return frames


def _check_budget(count: int, max_frames: int, where: str) -> None:
    """A row's frames within the frame budget, else an error naming `where`."""
    if count > max_frames:
        raise DatasetError(where, f"holds {count} frames, over the frame budget of {max_frames}",
                           "extract fewer frames (a lower fps) or raise --video_max_frames")  # fmt: skip


def _check_every_row_has_video(without: list[int], total: int, label: str, column: str, fix: str) -> None:
    """Refuse a set with no video at all, or rows with and without video mixed, naming the first row without."""
    if len(without) == total:
        raise DatasetError(label, f"has no row with a video in column {column!r}", fix)
    if without:
        raise DatasetError(
            f"row {without[0]} of {label}", f"has no video while other rows do ({len(without)} of {total} "
            "rows without one): mixed rows with and without video", "split them into a video and an image/text set",
        )  # fmt: skip


def check_frame_rows(frames: list[list[Any] | None], max_frames: int, label: str) -> None:
    """Frames-as-images rows built in memory (a row's frames, None for a row without video), checked as the
    EasyVideoR1 rows are, before any training step: every row has a video, every video frames, every row at most
    `max_frames` frames; each failure names its row of `label` and the `images` column."""
    without = [i for i, row in enumerate(frames) if row is None]
    _check_every_row_has_video(without, len(frames), label, "images", "give every row its frames")
    for index, row in enumerate(frames):
        where = f"row {index} of {label}, column 'images'"
        if not row:
            raise DatasetError(where, "has no frames", "give the video its frames or drop the row")
        _check_budget(len(row), max_frames, where)


def _has_a_video(value: Any) -> bool:
    return value not in (None, "", [])


def to_video_rows(
    dataset: Dataset,
    fmt: DatasetFormat,
    *,
    system_prompt: str | None,
    instruction: str,
    source: str | None = None,
    base_dir: Path | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Dataset:
    """TRL vision rows `{prompt, images (the frames), solution, problem_type}` plus `KEPT_COLUMNS`; every row must
    have a video (mixed rows with and without one are refused naming the first row without), every video frames,
    every row at most `max_frames` frames, an answer: each failure names its row and `source`."""
    label = source or f"the {fmt.name} dataset"
    without = [i for i, value in enumerate(dataset["videos"]) if not _has_a_video(value)]
    _check_every_row_has_video(without, len(dataset), label, "videos",
                               "for images use --dataset_format mmfinereason, for text a text format")  # fmt: skip

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"row {index} of {label}"
        question, answer = fmt.read(row, where)
        if answer is None or not str(answer).strip():
            raise DatasetError(where, "has no final answer", "fill `answer` or drop the row")
        frames = _row_videos(row, where, base_dir, max_frames)
        return {
            "prompt": chat_prompt(question, system_prompt, instruction),
            "images": frames,
            "solution": check_answer_length(str(answer).strip(), where),
            "problem_type": str(row.get("problem_type") or ""),
        }

    outputs = {"images": List(Image()), "solution": Value("string"), "problem_type": Value("string")}
    return map_vision_rows(dataset, convert, outputs)


dataset_format(
    "easyvideor1", columns=("problem",), images=("videos",), detect=_has_videos, priority=70, convert=to_video_rows,
    help="problem, answer (else solution; <answer> tags unwrapped), videos (frame folders or frame lists), "
    "problem_type (EasyVideoR1)",
)(_easyvideor1_row)  # fmt: skip
