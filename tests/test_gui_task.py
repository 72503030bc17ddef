"""The embedded GUI-grounding task (`rlsd.experiments.gui_task`): screens of labelled buttons drawn in the vision
task's bitmap font, "click X", a coordinate answer scored by a box reward, and the target's box reaching the teacher
as a drawn hint through the processor."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from test_vision import make_vl_model, rollout

from rlsd import RLSDTrainer
from rlsd.context.transforms import apply_transform
from rlsd.experiments.gui_task import (
    BORDER,
    Button,
    GuiTaskConfig,
    Screen,
    click_reward,
    make_gui_rl_dataset,
    parse_click,
    render_screen,
    sample_screens,
)
from rlsd.experiments.tiny_vlm import CELL, build_vl_processor
from rlsd.experiments.vision_task import render_expression

CONFIG = GuiTaskConfig()  # 6 x 3 cells: 18 image tokens


def test_screens_are_deterministic_and_buttons_are_apart():
    screens = sample_screens(CONFIG, 50, seed=0)
    assert screens == sample_screens(CONFIG, 50, seed=0) and screens != sample_screens(CONFIG, 50, seed=1)
    assert screens != sample_screens(CONFIG, 50, seed=0, split="test")
    for screen in screens:
        labels = [b.label for b in screen.buttons]
        assert len(set(labels)) == CONFIG.buttons and all(1 <= len(label) <= 2 for label in labels)
        for a in screen.buttons:  # a gap cell between any two buttons of a grid row
            for b in screen.buttons:
                apart = a.column + len(a.label) < b.column or b.column + len(b.label) < a.column
                assert a is b or a.row != b.row or apart, screen
        assert all(b.column >= 0 and b.column + len(b.label) <= CONFIG.columns for b in screen.buttons)
    with pytest.raises(ValueError, match="buttons of up to 2 cells may not fit"):
        GuiTaskConfig(columns=3, rows=1, buttons=2)


def test_the_screen_shows_each_label_in_its_cells_inside_a_border():
    screen = Screen((Button("37", 1, 0), Button("5", 4, 1)), target=0, config=GuiTaskConfig(columns=5, rows=2))
    image = render_screen(screen)
    assert image.size == (5 * CELL, 2 * CELL)
    assert screen.goal.box() == [28, 0, 84, 28] and screen.goal.centre() == (56, 14)
    assert screen.instruction() == "click 37" and screen.solution() == "<answer>56,14</answer>"
    glyphs = render_expression("37")
    inner = (1, 1, 2 * CELL - 1, CELL - 1)  # inside the 1-pixel border
    assert image.crop((29, 1, 83, 27)).tobytes() == glyphs.crop(inner).tobytes()
    assert {image.getpixel((x, 0)) for x in range(28, 84)} == {BORDER}  # the top edge
    assert {image.getpixel((83, y)) for y in range(28)} == {BORDER}  # the right edge, inside the box
    assert image.getpixel((84, 10)) == image.getpixel((10, 40)) == (255, 255, 255)  # outside every button


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ("<answer>56,14</answer>", 1.0),
        ("<answer>28,0</answer>", 1.0),  # the box's first pixel
        ("<answer>84,14</answer>", 0.0),  # x1 is exclusive
        ("<answer>56,28</answer>", 0.0),  # y1 is exclusive
        ("<answer> 30 , 27 </answer>", 1.0),
        ("<answer>1,1</answer><answer>60,20</answer>", 1.0),  # the last answer counts
        ("<answer>56</answer>", 0.0),
        ("56,14", 0.0),
    ],
)
def test_click_reward_is_one_inside_the_box(text, reward):
    assert click_reward([text], teacher_box=[[28, 0, 84, 28]]) == [reward]
    assert click_reward([[{"role": "assistant", "content": text}]], teacher_box=[[28, 0, 84, 28]]) == [reward]


def test_dataset_rows_carry_the_click_and_the_box():
    dataset = make_gui_rl_dataset(CONFIG, 8, seed=0)
    screens = sample_screens(CONFIG, 8, seed=0)
    assert set(dataset.column_names) == {"prompt", "image", "solution", "teacher_box"}
    for row, screen in zip(dataset, screens, strict=True):
        assert row["prompt"] == [{"role": "user", "content": screen.instruction()}]
        assert row["teacher_box"] == screen.goal.box()
        assert parse_click(f"<answer>{row['solution']}</answer>") == screen.goal.centre()
        assert row["image"].convert("RGB").tobytes() == render_screen(screen).tobytes()
    answers = [f"<answer>{s}</answer>" for s in dataset["solution"]]
    assert click_reward(answers, teacher_box=dataset["teacher_box"]) == [1.0] * 8


def test_the_teacher_sees_the_target_box_drawn_on_the_screen(tmp_path):
    processor = build_vl_processor(max_tokens_per_image=18)
    dataset = make_gui_rl_dataset(CONFIG, 4, seed=0)
    trainer = RLSDTrainer(
        make_vl_model(processor), click_reward, train_dataset=dataset, processing_class=processor,
        args=make_config(tmp_path, credit="rlsd", teacher="live", teacher_transform="draw_box",
                         max_completion_length=6, per_device_train_batch_size=2, num_generations=2,
                         reward_timeout=0),  # the reward in this process: no worker to start
    )  # fmt: skip
    rows = [dataset[0], dataset[0], dataset[1], dataset[1]]
    output = rollout(trainer, rows)
    assert output["image_grid_thw"].tolist() == [[1, 6, 12]] * 4  # 18 image tokens per screen
    _, _, types, _ = trainer.teacher_inputs(rows, output)
    drawn = [apply_transform("draw_box", "", [row["image"]], row, "row")[1][0] for row in rows]
    expected = processor.image_processor(images=drawn, return_tensors="pt")
    torch.testing.assert_close(types["pixel_values"], expected["pixel_values"])
    assert types["image_grid_thw"].tolist() == output["image_grid_thw"].tolist()
    trainer.train()
    assert any("loss" in entry for entry in trainer.state.log_history)
