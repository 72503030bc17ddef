"""Teacher-side input transforms: what the teacher is shown may differ from the student's input.

A transform is one function registered with `@teacher_transform(name)`, in this file or in the user's code. It receives
a row's prompt (a string or chat messages) and its images (a list, or None for text) as the student saw them, and
returns what the teacher sees instead; the privileged template is applied after it. `RLSDConfig.teacher_transform`
selects one by name (None: the teacher sees the student's input). Images go through the same processor path as the
student's, so the teacher's pixel values and grids are what the model expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

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
