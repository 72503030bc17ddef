"""Vision-language inputs: which columns and batch entries carry images, and the forward arguments that let the
self-teacher (and every re-scoring pass) see the student's images (TRL 1.16's vision path)."""

from __future__ import annotations

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
    """The student's images (or the teacher's own, when `teacher_types` carries image inputs: a teacher transform
    changed them), with the teacher prompt's token types (`teacher_types`, by processor key) extended by zeros over the
    completion, for a forward on [teacher prompt ; completion]; empty for text."""
    kwargs = {key: batch[key] for key in IMAGE_KEYS if batch.get(key) is not None}
    kwargs.update({key: value for key, value in teacher_types.items() if key in IMAGE_KEYS})
    for key, prompt_types in teacher_types.items():
        if key in IMAGE_KEYS:
            continue
        zeros = prompt_types.new_zeros(prompt_types.size(0), completion_length)
        kwargs[key] = torch.cat([prompt_types, zeros], dim=1)
    return kwargs
