"""Teacher-side input transforms: what the teacher is shown may differ from the student's input.

A transform is one function registered with `@teacher_transform(name)`, in this file or in the user's code. It receives
a row's prompt (a string or chat messages) and its images (a list, or None for text) as the student saw them, and
returns what the teacher sees instead; the privileged template is applied after it. `RLSDConfig.teacher_transform`
selects one by name (None: the teacher sees the student's input). Images go through the same processor path as the
student's, so the teacher's pixel values and grids are what the model expects.

The image transforms keep each image's size (so the number of image tokens; a transform that changes it is refused,
`apply_transform`) and apply to every image of a row, video frames given as images included: `blank_images`,
`noise_images`, `blur_images` (corrupted views, SRPO's visual-dependency probe), and the box transforms registered with
`@box_transform`, which read each row's box from the `teacher_box` column (`crop_to_box`, a zoom; `draw_box` and
`gaussian_mask`, GUI-SD's visual hints, and `box_hint`, both at once), checked before training
(`check_dataset_transform`, which also refuses a transform that changes an image's size)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageColor, ImageDraw, ImageFilter

Prompt = str | list[dict[str, Any]]
TeacherTransform = Callable[[Prompt, list[Any] | None], tuple[Prompt, list[Any] | None]]

TRANSFORMS: dict[str, TeacherTransform] = {}
"""Every registered transform by name: what `RLSDConfig.teacher_transform` selects from."""


def teacher_transform(name: str) -> Callable[[TeacherTransform], TeacherTransform]:
    """Register a transform under `name`."""

    def register(fn: TeacherTransform) -> TeacherTransform:
        if name in TRANSFORMS:
            raise ValueError(f"teacher transform {name!r} is registered twice")
        TRANSFORMS[name] = fn
        return fn

    return register


def get_transform(name: str) -> TeacherTransform:
    """The registered transform `name`; an unknown name is refused with the known ones listed."""
    if name not in TRANSFORMS:
        raise ValueError(f"teacher_transform={name!r} is not one of {', '.join(TRANSFORMS) or '(none registered)'}")
    return TRANSFORMS[name]


@teacher_transform("blank_images")
def blank_images(prompt: Prompt, images: list[Any] | None) -> tuple[Prompt, list[Any] | None]:
    """Each image replaced by a black one of the same size and mode: the teacher reads the text alone (a visual
    dependency probe, as SRPO's corrupted-image pass)."""
    if not images:
        return prompt, images
    return prompt, [Image.new(image.mode, image.size) for image in images]


@teacher_transform("mask_digits")
def mask_digits(prompt: Prompt, images: list[Any] | None) -> tuple[Prompt, list[Any] | None]:
    """Every digit of the prompt's text (a string, or each text of chat messages) replaced by `#`: a text task's
    corruption probe (SRPO's visual-dependency contrast transposed to the numbers a question shows)."""
    if isinstance(prompt, str):
        return _DIGITS.sub("#", prompt), images
    masked = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            content = _DIGITS.sub("#", content)
        elif isinstance(content, list):
            content = [{**b, "text": _DIGITS.sub("#", b["text"])} if b.get("type") == "text" else b for b in content]
        masked.append({**message, "content": content})
    return masked, images


_DIGITS = re.compile(r"[0-9]")

# ------------------------------------------------------------------------------------------------ image transforms
BOX_COLUMN = "teacher_box"
"""The dataset column a box transform reads: [x0, y0, x1, y1] in pixels (x1, y1 exclusive) for every image of the row,
or one such box per image."""
BOXED: set[str] = set()
"""The registered transforms that read a box per row (`BOX_COLUMN`): called as `fn(prompt, images, boxes)`."""
Box = tuple[int, int, int, int]
NOISE_SIGMA = 64.0
"""Standard deviation (in 0-255 pixel units) of `noise_images`'s Gaussian noise."""
BLUR_RADIUS = 2.0
"""Radius in pixels of `blur_images`'s Gaussian blur."""
BOX_LINE = 2
"""Width in pixels of the outline `draw_box` draws (inside the box)."""


def box_transform(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a transform that also reads each row's boxes (`fn(prompt, images, boxes)`, one box per image)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        teacher_transform(name)(fn)
        BOXED.add(name)
        return fn

    return register


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def row_boxes(value: Any, images: list[Any], where: str) -> list[Box]:
    """The box of each image of a row from its `BOX_COLUMN` value (one box for all its images, or one per image),
    each checked to lie inside its image; a missing or malformed value is refused naming the column and `where`."""
    if value is None:
        raise ValueError(f"{where} has no {BOX_COLUMN!r} value: the box transform reads [x0, y0, x1, y1] per row")
    value = list(value) if isinstance(value, list | tuple) else value
    if isinstance(value, list) and len(value) == 4 and all(_is_int(v) for v in value):
        boxes = [tuple(value)] * len(images)
    elif isinstance(value, list) and all(isinstance(b, list | tuple) and len(b) == 4 and all(_is_int(v) for v in b)
                                         for b in value) and len(value) == len(images):  # fmt: skip
        boxes = [tuple(b) for b in value]
    else:
        raise ValueError(
            f"{where}: column {BOX_COLUMN!r} must hold [x0, y0, x1, y1] (integer pixels, x1 and y1 exclusive) or one "
            f"such box per image ({len(images)} here), got {value!r}"
        )
    for index, (box, image) in enumerate(zip(boxes, images, strict=True)):
        x0, y0, x1, y1 = box
        width, height = image.size
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"{where}: the {BOX_COLUMN!r} box {list(box)} of image {index} is empty or outside the "
                f"{width}x{height} image (need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)"
            )
    return boxes  # type: ignore[return-value]


def apply_transform(name: str, prompt: Prompt, images: list[Any] | None, row: dict[str, Any], where: str):
    """The transform `name` applied to one row (its box read from `row` for a box transform); a transform that
    changes an image's size (and so the number of image tokens the prompt holds) is refused naming `where`."""
    transform = get_transform(name)
    if name in BOXED:
        if not images:  # a text row: nothing to draw on
            return prompt, images
        new_prompt, new_images = transform(prompt, images, row_boxes(row.get(BOX_COLUMN), images, where))
    else:
        new_prompt, new_images = transform(prompt, images)
    before = [image.size for image in images or []]
    after = [image.size for image in new_images or []]
    if new_images is not None and before != after:
        raise ValueError(
            f"teacher_transform={name!r} changed the images of {where} from sizes {before} to {after}: the teacher "
            "prompt would hold another number of image tokens than the student's; keep each image's size"
        )
    return new_prompt, new_images


def check_images_to_transform(name: str | None, has_images: bool) -> None:
    """Refuse a built-in image transform on a run without images: the teacher would see the student's input (SRPO's
    contrast would be 0 and its credit GRPO's) while the config says otherwise."""
    if name in IMAGE_ONLY and not has_images:
        raise ValueError(
            f"teacher_transform={name!r} changes only images, and neither train_dataset nor eval_dataset has an "
            "`image`/`images` column: the teacher would see the student's input unchanged; drop the transform or "
            "add the images"
        )


def check_dataset_transform(dataset: Any, name: str | None, split_name: str) -> None:
    """Before training: the transform applied once to every row of a map-style split that has images, so that a box
    transform's missing column or bad box (malformed, outside its image) and any transform that changes an image's
    size (the number of image tokens) is refused naming the first bad row, before any step."""
    from datasets import Dataset

    if name is None or not isinstance(dataset, Dataset):
        return
    columns = dataset.column_names
    image_column = "images" if "images" in columns else "image" if "image" in columns else None
    if image_column is None:
        return
    if name in BOXED and BOX_COLUMN not in columns:
        raise ValueError(
            f"teacher_transform={name!r} reads a box per row from the {BOX_COLUMN!r} column, which {split_name} "
            f"lacks (its columns: {sorted(columns)})"
        )
    read = [column for column in (image_column, BOX_COLUMN, "prompt") if column in columns]
    for index, row in enumerate(dataset.select_columns(read)):
        images = row[image_column] if image_column == "images" else [row[image_column]]
        images = [image for image in images or [] if image is not None]
        if images:
            apply_transform(name, row.get("prompt", ""), images, row, f"{split_name} row {index}")


def _pixels(image: Image.Image) -> Image.Image:
    """The image in a mode whose bytes are 8-bit channels (L, RGB, RGBA kept; others converted to RGB)."""
    return image if image.mode in ("L", "RGB", "RGBA") else image.convert("RGB")


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """(H, W, C) float64 pixel values of an 8-bit image."""
    channels = len(image.getbands())
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.size[1], image.size[0], channels).double()


def _from_tensor(values: torch.Tensor, mode: str) -> Image.Image:
    """An image of `mode` from (H, W, C) pixel values (rounded, clipped to 0-255)."""
    data = values.round().clamp(0, 255).to(torch.uint8).contiguous()
    return Image.frombytes(mode, (data.size(1), data.size(0)), data.numpy().tobytes())


@teacher_transform("noise_images")
def noise_images(prompt: Prompt, images: list[Any] | None) -> tuple[Prompt, list[Any] | None]:
    """Gaussian pixel noise (sigma `NOISE_SIGMA`), seeded by each image's bytes (the same image always gets the same
    noise): a corrupted view for a visual-dependency probe that keeps the image's layout statistics."""
    if not images:
        return prompt, images
    noisy = []
    for image in images:
        image = _pixels(image)
        values = _as_tensor(image)
        generator = torch.Generator().manual_seed(zlib.crc32(image.tobytes()))
        noise = torch.randn(values.shape, generator=generator, dtype=torch.float64) * NOISE_SIGMA
        noisy.append(_from_tensor(values + noise, image.mode))
    return prompt, noisy


@teacher_transform("blur_images")
def blur_images(prompt: Prompt, images: list[Any] | None) -> tuple[Prompt, list[Any] | None]:
    """A Gaussian blur of radius `BLUR_RADIUS` pixels: fine detail (a digit's strokes) is lost, the layout kept."""
    if not images:
        return prompt, images
    return prompt, [image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)) for image in images]


@box_transform("crop_to_box")
def crop_to_box(prompt: Prompt, images: list[Any], boxes: list[Box]) -> tuple[Prompt, list[Any]]:
    """Each image cropped to its box and resized (bicubic) back to the image's size: a zoom on the box that keeps
    the number of image tokens."""
    pairs = zip(images, boxes, strict=True)
    return prompt, [image.crop(box).resize(image.size, Image.Resampling.BICUBIC) for image, box in pairs]


@box_transform("draw_box")
def draw_box(prompt: Prompt, images: list[Any], boxes: list[Box]) -> tuple[Prompt, list[Any]]:
    """A red outline `BOX_LINE` pixels wide drawn just inside each box (GUI-SD's visual hint: where the target is)."""
    drawn = []
    for image, (x0, y0, x1, y1) in zip(images, boxes, strict=True):
        image = image.copy()
        colour = ImageColor.getcolor("red", image.mode)
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=BOX_LINE)
        drawn.append(image)
    return prompt, drawn


@box_transform("gaussian_mask")
def gaussian_mask(prompt: Prompt, images: list[Any], boxes: list[Box]) -> tuple[Prompt, list[Any]]:
    """Each pixel faded to black by g = exp(-((x - cx)^2 / 2 sx^2 + (y - cy)^2 / 2 sy^2)) around its box's centre
    (cx, cy), sx and sy half the box's width and height (pixel centres at +0.5): the box stays visible, the rest
    fades (a soft mask hint)."""
    masked = []
    for image, (x0, y0, x1, y1) in zip(images, boxes, strict=True):
        image = _pixels(image)
        values = _as_tensor(image)
        height, width = values.shape[:2]
        cx, cy, sx, sy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        xs = ((torch.arange(width, dtype=torch.float64) + 0.5 - cx) / sx) ** 2
        ys = ((torch.arange(height, dtype=torch.float64) + 0.5 - cy) / sy) ** 2
        weight = torch.exp(-0.5 * (ys.unsqueeze(1) + xs.unsqueeze(0))).unsqueeze(-1)
        masked.append(_from_tensor(values * weight, image.mode))
    return prompt, masked


@box_transform("box_hint")
def box_hint(prompt: Prompt, images: list[Any], boxes: list[Box]) -> tuple[Prompt, list[Any]]:
    """GUI-SD's visual hint as its paper describes it (arXiv 2605.00642): the Gaussian soft mask around each box
    (`gaussian_mask`) with the box's red outline drawn over it (`draw_box`); no coordinate is shown."""
    _, masked = gaussian_mask(prompt, images, boxes)
    return draw_box(prompt, masked, boxes)


IMAGE_ONLY = frozenset({"blank_images", "noise_images", "blur_images", *BOXED})
"""The built-in transforms that change only images (refused on a run without images)."""
