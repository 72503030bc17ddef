"""Vision-language inputs: which columns and batch entries carry images, and the forward arguments that let the
self-teacher (and every re-scoring pass) see the student's images (TRL 1.16's vision path)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from datasets import Dataset, IterableDatasetDict

from rlsd.context.templates import has_image_blocks

IMAGE_COLUMNS = ("image", "images")
IMAGE_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "num_tiles", "pixel_attention_mask", "spatial_shapes",
    "image_sizes", "image_position_ids",
)  # fmt: skip
"""The per-image inputs TRL 1.16 hands to every scoring forward of a vision-language model (the same for the teacher:
it sees the same images)."""
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
"""Per-token inputs of a vision-language model, recomputed for the teacher's sequence."""


IMAGE_BLOCKS_ERROR = (
    "{where} has image blocks inside its prompts and no `image`/`images` column: TRL 1.16 passes pixel values to "
    "its scoring forwards only for images from such a column, so neither the loss nor the self-teacher would see "
    "these images; put the images in an `images` column (the prompts may keep empty {{'type': 'image'}} "
    "placeholders) or use credit='grpo' with distill_loss='none'"
)

TOKENIZER_WITH_IMAGES_ERROR = (
    "the dataset has an image column and {what} uses the self-teacher, but processing_class is a tokenizer: the "
    "teacher would score the completions without the images; pass the model's processor (AutoProcessor) as "
    "processing_class"
)


def teacher_use(args: Any) -> str:
    """What in the config uses the self-teacher, for error messages."""
    parts = [f"credit={args.credit!r}"] if args.credit != "grpo" else []
    if args.distill_loss != "none":
        parts.append(f"distill_loss={args.distill_loss!r}")
    return " with ".join(parts) or "the config"


def image_dataset(dataset: Any) -> bool:
    """True when a dataset (or any split of a dict of them) has an `image` or `images` column."""
    if dataset is None:
        return False
    parts = dataset.values() if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
    return any(set(IMAGE_COLUMNS) & set(getattr(part, "column_names", None) or []) for part in parts)


def prompts_hold_images(dataset: Any, rows: int = 16) -> bool:
    """True when one of the first `rows` prompts of a map-style dataset (or any split) holds an image block."""
    if dataset is None:
        return False
    parts = dataset.values() if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
    for part in parts:
        if not isinstance(part, Dataset) or "prompt" not in part.column_names:
            continue
        if any(has_image_blocks(prompt) for prompt in part.select(range(min(rows, len(part))))["prompt"]):
            return True
    return False


def batch_images(inputs: list[dict[str, Any]]) -> list[list[Any] | None] | None:
    """The images of each rollout row exactly as TRL 1.16 collects them (`images` list or single `image` column);
    None when the batch carries none."""
    if "images" in inputs[0]:
        images = [row.get("images") for row in inputs]
    elif "image" in inputs[0]:
        images = [[row.get("image")] if row.get("image") is not None else None for row in inputs]
    else:
        return None
    return None if all(not image_list for image_list in images) else images


def student_vision_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The vision inputs TRL stored with the rollout (images and the student's token types), for a forward on
    [student prompt ; completion]; empty for text."""
    return {key: batch[key] for key in (*IMAGE_KEYS, *TOKEN_TYPE_KEYS) if batch.get(key) is not None}


def teacher_vision_kwargs(
    batch: dict[str, Any], teacher_types: dict[str, Any], completion_length: int
) -> dict[str, Any]:
    """The student's images (or the teacher's own, when `teacher_types` carries image inputs, flat or row-first
    (`rows_first`): a teacher transform changed them), with the teacher prompt's token types (`teacher_types`, by
    processor key) extended over the completion by the rollout's (zeros, or a tool's images: TRL's multi-turn
    rollouts), for a forward on [teacher prompt ; completion]; empty for text."""
    kwargs = {key: batch[key] for key in IMAGE_KEYS if batch.get(key) is not None}
    kwargs.update({key: value for key, value in teacher_types.items() if key in IMAGE_KEYS})
    if ROW_FIRST["pixel_values"] in teacher_types:  # the teacher's own images, carried row by row
        kwargs.update(flat_images(teacher_types))
    for key, prompt_types in teacher_types.items():
        if key in IMAGE_KEYS or key in ROW_FIRST.values():
            continue
        student = batch.get(key)  # TRL's over [prompt ; completion]: a tool's images mark the completion too
        completion = prompt_types.new_zeros(prompt_types.size(0), completion_length)
        if student is not None and student.size(1) >= completion_length:
            completion = student[:, student.size(1) - completion_length :].to(prompt_types.dtype)
        kwargs[key] = torch.cat([prompt_types, completion], dim=1)
    return kwargs


ROW_FIRST = {"pixel_values": "row_pixel_values", "image_grid_thw": "row_image_grid_thw"}
"""The keys under which the teacher's own images travel row by row (`rows_first`) to the loss-time teacher pass."""


def rows_first(processed: dict[str, Any], images_per_row: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's processed images (the processor's flat layout: `pixel_values` (patches, D) and `image_grid_thw`
    (images, 3)) one rollout row per entry: (B, most patches, D) and (B, most images, 3), zero-padded (a padding
    grid row is all zeros). TRL shuffles and splits the rollout by rows into micro-batches, which cuts a flat layout
    at the wrong places; row-first tensors travel with their rows (`flat_images` restores the flat layout). Only the
    grid layout (Qwen-VL family) is supported; another processor's image inputs are refused by name."""
    others = sorted(set(processed) & set(IMAGE_KEYS) - set(ROW_FIRST) - {"num_images"})
    if others or set(ROW_FIRST) - set(processed):
        raise NotImplementedError(
            f"the teacher's own images (a teacher transform) for a loss-time teacher pass need the processor's "
            f"pixel_values and image_grid_thw only (the Qwen-VL layout); this processor gives {sorted(processed)}"
        )
    pixels, grids = processed["pixel_values"], processed["image_grid_thw"]
    if sum(images_per_row) != grids.size(0):
        raise ValueError(f"{grids.size(0)} processed images for {sum(images_per_row)} images in the rows")
    per_image = list(torch.split(pixels, grids.prod(-1).tolist()))
    starts = [0, *itertools.accumulate(images_per_row)][:-1]
    rows = [per_image[start : start + count] for start, count in zip(starts, images_per_row, strict=True)]
    width = max([sum(part.size(0) for part in row) for row in rows] + [1])
    row_pixels = pixels.new_zeros(len(rows), width, pixels.size(-1))
    row_grids = grids.new_zeros(len(rows), max([*images_per_row, 1]), 3)
    for row, (start, count) in enumerate(zip(starts, images_per_row, strict=True)):
        if count:
            patches = torch.cat(rows[row])
            row_pixels[row, : patches.size(0)] = patches
            row_grids[row, :count] = grids[start : start + count]
    return {ROW_FIRST["pixel_values"]: row_pixels, ROW_FIRST["image_grid_thw"]: row_grids}


def flat_images(types: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The flat `pixel_values` and `image_grid_thw` of row-first teacher images (`rows_first`), rows in order, for
    whichever rows (a micro-batch) `types` holds."""
    row_pixels, row_grids = types[ROW_FIRST["pixel_values"]], types[ROW_FIRST["image_grid_thw"]]
    counts = row_grids.prod(-1)  # (B, I): patches per image, 0 on padding
    patches = counts.sum(1).tolist()
    return {
        "pixel_values": torch.cat([row_pixels[row, :n] for row, n in enumerate(patches)]),
        "image_grid_thw": row_grids[counts > 0],
    }
