"""The embedded GUI-grounding task: synthetic screens of labelled buttons, the instruction "click X", a coordinate
answer and a box reward (issue 23's stand-in for GUI-SD's grounding data; drawn offline, nothing downloaded).

A screen is a grid of 28x28 cells (one image token each with the tiny Qwen2-VL); a button is a run of cells in one grid
row holding its label, drawn in the vision task's 3x5 bitmap font (`rlsd.experiments.vision_task.render_expression`:
digits and `+-*`), outlined by a 1-pixel border. The prompt is the text `click 37` next to the screen; the completion
answers the click as pixel coordinates, `<answer>98,42</answer>`; the reward is 1 when the click lies inside the
target button's box, else 0. Each row carries the target's box in `teacher_box` ([x0, y0, x1, y1], x1 and y1
exclusive), which the box transforms (`draw_box`, `gaussian_mask`, `crop_to_box`) show the teacher: GUI-SD's visual
hint.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from PIL import Image, ImageDraw

from rlsd.experiments.tiny_vlm import CELL
from rlsd.experiments.vision_task import render_expression

BORDER = (96, 96, 96)
"""The colour of a button's 1-pixel outline."""
_ANSWER_RE = re.compile(r"<answer>\s*(-?\d+)\s*,\s*(-?\d+)\s*</answer>")


@dataclass(frozen=True)
class GuiTaskConfig:
    """The screens: a grid of `columns` x `rows` cells holding `buttons` buttons labelled with distinct numbers of
    1 to `label_digits` digits (a 1-cell gap between buttons of the same grid row)."""

    columns: int = 6
    rows: int = 3
    buttons: int = 3
    label_digits: int = 2

    def __post_init__(self) -> None:
        if min(self.columns, self.rows, self.buttons, self.label_digits) < 1:
            raise ValueError(f"columns, rows, buttons and label_digits must be >= 1, got {self}")
        if self.label_digits > self.columns:
            raise ValueError(f"label_digits={self.label_digits} does not fit a row of {self.columns} cells")
        if self.buttons > self.rows * ((self.columns + 1) // (self.label_digits + 1)):
            raise ValueError(f"{self.buttons} buttons of up to {self.label_digits} cells may not fit {self}")


@dataclass(frozen=True)
class Button:
    """A button: its label and its top-left cell."""

    label: str
    column: int
    row: int

    def box(self) -> list[int]:
        """[x0, y0, x1, y1] in pixels (x1, y1 exclusive): the button's cells."""
        return [self.column * CELL, self.row * CELL, (self.column + len(self.label)) * CELL, (self.row + 1) * CELL]

    def centre(self) -> tuple[int, int]:
        """The pixel at the middle of the box (the reference click)."""
        x0, y0, x1, y1 = self.box()
        return (x0 + x1) // 2, (y0 + y1) // 2


@dataclass(frozen=True)
class Screen:
    """One screen: its buttons and which one the instruction names."""

    buttons: tuple[Button, ...]
    target: int
    config: GuiTaskConfig

    @property
    def goal(self) -> Button:
        return self.buttons[self.target]

    def instruction(self) -> str:
        """The prompt's text: `click <label>`."""
        return f"click {self.goal.label}"

    def solution(self) -> str:
        """The reference completion: the target's centre as the answer."""
        x, y = self.goal.centre()
        return f"<answer>{x},{y}</answer>"


def sample_screen(rng: random.Random, config: GuiTaskConfig) -> Screen:
    """Buttons with distinct labels placed in free runs of cells (a gap cell between neighbours of a grid row), and a
    target drawn uniformly among them; a layout that leaves no room for a label is drawn again."""
    while True:
        labels: list[str] = []
        while len(labels) < config.buttons:
            label = str(rng.randint(0, 10 ** rng.randint(1, config.label_digits) - 1))
            labels += [] if label in labels else [label]
        buttons = _place(rng, config, labels)
        if buttons is not None:
            return Screen(tuple(buttons), rng.randrange(len(buttons)), config)


def _place(rng: random.Random, config: GuiTaskConfig, labels: list[str]) -> list[Button] | None:
    """Each label at a random free run of cells, marking it and a gap cell on each side taken; None when one does not
    fit."""
    free = [[True] * config.columns for _ in range(config.rows)]
    buttons = []
    for label in labels:
        width = len(label)
        places = [(c, r) for r in range(config.rows) for c in range(config.columns - width + 1)
                  if all(free[r][c:c + width])]  # fmt: skip
        if not places:
            return None
        column, row = rng.choice(places)
        for c in range(max(0, column - 1), min(config.columns, column + width + 1)):
            free[row][c] = False
        buttons.append(Button(label, column, row))
    return buttons


def render_screen(screen: Screen) -> Image.Image:
    """The screen as an RGB image: white, each button's label in the bitmap font in its cells and a 1-pixel border
    just inside its box."""
    config = screen.config
    image = Image.new("RGB", (config.columns * CELL, config.rows * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for button in screen.buttons:
        x0, y0, x1, y1 = button.box()
        image.paste(render_expression(button.label), (x0, y0))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BORDER, width=1)
    return image


def sample_screens(config: GuiTaskConfig, count: int, seed: int, split: str = "train") -> list[Screen]:
    """`count` screens of `split` ("train" or "test"), deterministic in `seed` (the splits draw from separate
    streams)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"gui-{seed}-{split}")
    return [sample_screen(rng, config) for _ in range(count)]


def make_gui_rl_dataset(config: GuiTaskConfig, count: int, seed: int, split: str = "train") -> Dataset:
    """Rows for `RLSDTrainer` with a processor: a conversational `prompt` (`click 37`), the screen's `image`, the
    reference click in `solution` (`98,42`: what the teacher is shown with `privileged_source="answer"`) and the
    target's box in `teacher_box` (what `click_reward` scores and the box transforms draw)."""
    rows = []
    for screen in sample_screens(config, count, seed, split):
        x, y = screen.goal.centre()
        rows.append({
            "prompt": [{"role": "user", "content": screen.instruction()}],
            "image": render_screen(screen),
            "solution": f"{x},{y}",
            "teacher_box": screen.goal.box(),
        })  # fmt: skip
    return Dataset.from_list(rows)


def parse_click(text: str) -> tuple[int, int] | None:
    """The (x, y) of the last `<answer>x,y</answer>` in a completion; None when there is none."""
    found = _ANSWER_RE.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def inside(click: tuple[int, int] | None, box: list[int]) -> bool:
    """Whether a click lies in [x0, x1) x [y0, y1)."""
    if click is None:
        return False
    x0, y0, x1, y1 = box
    return x0 <= click[0] < x1 and y0 <= click[1] < y1


def click_reward(completions: list[Any], teacher_box: list[list[int]], **kwargs: Any) -> list[float]:
    """The box reward with TRL's reward signature: 1.0 when the answered click lies inside the target's box (the
    `teacher_box` column), else 0.0 (no answer, a malformed one, or a miss)."""
    rewards = []
    for completion, box in zip(completions, teacher_box, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        rewards.append(1.0 if inside(parse_click(text), box) else 0.0)
    return rewards
