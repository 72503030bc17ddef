"""The image teacher transforms (`rlsd.context.transforms`): each pinned on a tiny hand-made image, the boxes read
per row from `teacher_box` (refused, naming the column and the row, when missing or malformed), and the transformed
images reaching the teacher through the processor with the pixel values and grids the model expects."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_vision import build, make_vision_dataset, processor, rollout  # noqa: F401  (a module fixture)

from rlsd.context.transforms import (
    BOX_COLUMN,
    TRANSFORMS,
    apply_transform,
    row_boxes,
    teacher_transform,
)

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def halves(width: int = 56, height: int = 28) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def run(name: str, image: Image.Image, box=None) -> Image.Image:
    """The transform `name` on one image (with `box` as the row's `teacher_box`)."""
    _, images = apply_transform(name, "Q", [image], {BOX_COLUMN: box}, "row 0")
    return images[0]


# ------------------------------------------------------------------------------------------------ pixel values
def test_blank_is_a_constant_black_image_of_the_same_size():
    out = run("blank_images", halves())
    assert out.size == (56, 28) and out.mode == "RGB"
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_noise_is_deterministic_per_image_and_keeps_the_size():
    image = Image.new("L", (28, 28), 128)
    first, second = run("noise_images", image), run("noise_images", image)
    assert first.size == (28, 28) and first.mode == "L"
    assert first.tobytes() == second.tobytes()  # seeded by the image's bytes
    values = torch.tensor(list(first.getdata()), dtype=torch.float64)
    assert 40 < values.std().item() < 80  # sigma 64 around 128, a little clipped
    assert run("noise_images", Image.new("L", (28, 28), 127)).tobytes() != first.tobytes()


def test_blur_keeps_a_flat_image_and_spreads_a_dot():
    flat = Image.new("RGB", (28, 28), (90, 90, 90))
    assert run("blur_images", flat).tobytes() == flat.tobytes()
    dot = Image.new("L", (28, 28), 0)
    dot.putpixel((14, 14), 255)
    out = run("blur_images", dot)
    assert 0 < out.getpixel((14, 14)) < 255 and out.getpixel((15, 14)) > 0 and out.getpixel((0, 0)) == 0


@pytest.mark.parametrize(("box", "colour"), [([0, 0, 28, 28], RED), ([28, 0, 56, 28], BLUE)])
def test_crop_to_box_zooms_the_box_to_the_image_size(box, colour):
    out = run("crop_to_box", halves(), box)
    assert out.size == (56, 28)  # resized back: the same number of image tokens
    assert set(out.getdata()) == {colour}


def test_crop_to_box_magnifies_the_box_content():
    image = Image.new("L", (28, 28), 0)
    image.paste(255, (0, 0, 7, 28))  # a white band 7 pixels wide on the left
    out = run("crop_to_box", image, [0, 0, 14, 28])  # 2x zoom on the left half
    row = [out.getpixel((x, 10)) for x in range(28)]
    assert row[:12] == [255] * 12 and row[16:] == [0] * 12  # the band is now 14 pixels wide (edge blended)


def test_draw_box_outlines_exactly_the_box_inside_its_edges():
    out = run("draw_box", Image.new("RGB", (28, 28), WHITE), [4, 6, 20, 18])
    outline = {(x, y) for x in range(4, 20) for y in range(6, 18)} - {
        (x, y) for x in range(6, 18) for y in range(8, 16)
    }  # 2 pixels wide, inside [x0, x1) x [y0, y1)
    for x in range(28):
        for y in range(28):
            assert out.getpixel((x, y)) == (RED if (x, y) in outline else WHITE), (x, y)


def test_gaussian_mask_fades_away_from_the_box_centre():
    out = run("gaussian_mask", Image.new("L", (28, 28), 255), [10, 10, 18, 18])
    # centre (14, 14), sigma 4: g(13, 13) = exp(-0.5 * 2 * (0.5 / 4)^2) = 0.98450 -> 251.05
    assert out.getpixel((13, 13)) == 251
    # g(10, 14) = exp(-0.5 * ((3.5 / 4)^2 + (0.5 / 4)^2)) = exp(-0.390625) = 0.67668 -> 172.55
    assert out.getpixel((10, 14)) == 173
    assert out.getpixel((0, 0)) == 0


# ------------------------------------------------------------------------------------------------------- boxes
def test_one_box_for_every_image_or_one_per_image():
    images = [Image.new("RGB", (28, 28)), Image.new("RGB", (56, 28))]
    assert row_boxes([0, 0, 28, 28], images, "row 0") == [(0, 0, 28, 28)] * 2
    assert row_boxes([[0, 0, 5, 5], [30, 0, 56, 28]], images, "row 0") == [(0, 0, 5, 5), (30, 0, 56, 28)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"row 3 has no 'teacher_box' value"),
        ([0, 0, 28], r"row 3: column 'teacher_box' must hold \[x0, y0, x1, y1\]"),
        ([0.0, 0.0, 5.0, 5.0], r"row 3: column 'teacher_box' must hold"),
        ([[0, 0, 5, 5]] * 3, r"one such box per image \(1 here\)"),
        ([0, 0, 29, 28], r"row 3: the 'teacher_box' box \[0, 0, 29, 28\] of image 0 is empty or outside the 28x28"),
        ([5, 5, 5, 9], r"is empty or outside"),
    ],
)
def test_bad_boxes_are_refused_naming_the_column_and_the_row(value, message):
    with pytest.raises(ValueError, match=message):
        row_boxes(value, [Image.new("RGB", (28, 28))], "row 3")


def test_a_transform_that_changes_the_image_size_is_refused_naming_the_row():
    @teacher_transform("test-shrink")
    def shrink(prompt, images):
        return prompt, [image.resize((14, 14)) for image in images]

    try:
        with pytest.raises(ValueError, match=r"'test-shrink' changed the images of rollout row 2 from sizes"):
            apply_transform("test-shrink", "Q", [Image.new("RGB", (28, 28))], {}, "rollout row 2")
    finally:
        TRANSFORMS.pop("test-shrink")


def test_text_rows_pass_through_a_box_transform():
    assert apply_transform("draw_box", "Q", None, {}, "row 0") == ("Q", None)


# -------------------------------------------------------------------------------------- through the processor
@pytest.mark.parametrize("name", ["blank_images", "noise_images", "blur_images", "crop_to_box", "draw_box",
                                  "gaussian_mask"])  # fmt: skip
def test_each_transform_keeps_the_grid_the_processor_gives_the_student(processor, name):  # noqa: F811
    image = halves()
    out = run(name, image, [2, 2, 30, 26])
    student = processor.image_processor(images=[image], return_tensors="pt")
    teacher = processor.image_processor(images=[out], return_tensors="pt")
    assert student["image_grid_thw"].tolist() == teacher["image_grid_thw"].tolist() == [[1, 2, 4]]  # 2 image tokens
    assert teacher["pixel_values"].shape == student["pixel_values"].shape
    assert not torch.equal(teacher["pixel_values"], student["pixel_values"])


def boxed_dataset(boxes):
    """The vision test rows with a `teacher_box` column."""
    return make_vision_dataset().add_column(BOX_COLUMN, boxes)


def test_boxed_images_reach_the_teacher_through_the_processor(processor, tmp_path):  # noqa: F811
    dataset = boxed_dataset([[0, 0, 14, 14], [14, 14, 28, 28], [4, 4, 24, 24], [0, 0, 28, 28]])
    trainer = build(processor, tmp_path, dataset=dataset, teacher="live", teacher_transform="draw_box",
                    per_device_train_batch_size=2, num_generations=2)  # fmt: skip
    rows = [dataset[i] for i in range(4)]
    output = rollout(trainer, rows)
    _, _, types, _ = trainer.teacher_inputs(rows, output)
    drawn = [run("draw_box", row["image"], row[BOX_COLUMN]) for row in rows]
    expected = processor.image_processor(images=drawn, return_tensors="pt")
    torch.testing.assert_close(types["pixel_values"], expected["pixel_values"])
    assert types["image_grid_thw"].tolist() == output["image_grid_thw"].tolist()
    assert types["mm_token_type_ids"].sum(1).tolist() == [1, 1, 1, 1]  # one image token per 28x28 row
    assert not torch.equal(types["pixel_values"], output["pixel_values"])


def test_a_missing_box_column_is_refused_before_training(processor, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"'draw_box' reads a box per row from the 'teacher_box' column, which "
                                         r"train_dataset lacks"):  # fmt: skip
        build(processor, tmp_path, teacher="live", teacher_transform="draw_box")


def test_a_bad_box_is_refused_before_training_naming_the_row(processor, tmp_path):  # noqa: F811
    dataset = boxed_dataset([[0, 0, 14, 14], [0, 0, 14, 14], [0, 0, 14, 40], [0, 0, 14, 14]])
    with pytest.raises(ValueError, match=r"train_dataset row 2: the 'teacher_box' box \[0, 0, 14, 40\]"):
        build(processor, tmp_path, dataset=dataset, teacher="live", teacher_transform="draw_box")
