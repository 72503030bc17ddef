"""The GUI demo (`rlsd demo --task gui`): the warm start's three formats, the viewer's click marker, and the quick run
writing a summary row per method through the shared task-demo runner."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from rlsd.commands.cli import main as cli_main
from rlsd.experiments.gui_demo import CLICK_COLOUR, GuiDemoConfig, hint_image, marked_click, teacher_text
from rlsd.experiments.gui_task import Button, GuiTaskConfig, Screen, render_screen

SCREEN = Screen((Button("37", 1, 0), Button("5", 4, 1)), target=0, config=GuiTaskConfig(columns=5, rows=2))


def test_the_teachers_formats_show_the_click_or_the_box():
    assert teacher_text(SCREEN) == "[ref 56,14] click 37"
    plain = render_screen(SCREEN)
    hinted = hint_image(SCREEN, plain)
    assert hinted.size == plain.size
    assert hinted.getpixel((28, 10)) == (255, 0, 0)  # the box's red outline
    assert plain.getpixel((80, 50)) == (255, 255, 255) and hinted.getpixel((80, 50))[0] < 30  # away: faded


def test_the_viewer_marks_the_click_and_leaves_the_screen_otherwise():
    screen = Image.new("RGB", (56, 28), (255, 255, 255))
    marked = marked_click(screen, (20, 10))
    assert marked.getpixel((20, 10)) == marked.getpixel((17, 10)) == marked.getpixel((20, 13)) == CLICK_COLOUR
    assert marked.getpixel((24, 10)) == marked.getpixel((10, 20)) == (255, 255, 255)
    assert marked_click(screen, None).tobytes() == screen.tobytes()
    assert screen.getpixel((20, 10)) == (255, 255, 255)  # a copy is marked


def test_unknown_methods_are_refused_before_the_warm_start():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['gui-sdd'\]"):
        GuiDemoConfig(methods=("grpo", "gui-sdd"))


@pytest.mark.slow
def test_gui_demo_quick_writes_a_row_per_method(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gui-demo"
    argv = ["demo", "--task", "gui", "--quick", "--methods", "grpo,gui-sd", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for phase in ("gui warm start: ", "gui-sd (gui, seed 0): training, 2 steps", "credit viewer: ", "report: "):
        assert phase in printed, phase
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "gui" and list(summary["methods"]) == ["grpo", "gui-sd"]
    for numbers in summary["methods"].values():
        assert 0.0 <= numbers["final_pass_at_1"] <= 1.0 and numbers["seconds_per_step"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if r["kind"] == "eval" and r["method"] == "gui-sd"} == {0, 1, 2}
    train = [r for r in rows if r["kind"] == "train" and r["method"] == "gui-sd"]
    assert train and all(r["rlsd/distill_loss"] > 0 for r in train)  # the teacher shown the hint distils
    report = (out / "report.html").read_text()
    assert 'alt="problem image" src="data:image/png;base64,' in report and "[screen] click " in report


def test_the_pilot_screens_are_fixed_and_outside_the_held_out_ones():
    from rlsd.experiments.gui_demo import evaluation_screens

    config = GuiTaskConfig()
    pilot, held = evaluation_screens(config, 200, "pilot"), evaluation_screens(config, 1000)
    assert len(set(pilot)) == 200 and not set(pilot) & set(held)
    assert pilot == evaluation_screens(config, 200, "pilot") and held[:200] == evaluation_screens(config, 200)
    with pytest.raises(ValueError, match="eval_set must be one of"):
        GuiDemoConfig(eval_set="test")
