"""GUI-SD (`rlsd.core.gui_sd`, reconstructed weights): digit significance and teacher confidence pinned by hand, the
distillation term weighting each token by their product, the teacher's own (transformed) images reaching the loss-time
teacher forward row by row through TRL's shuffle and micro-batch split, and a loss when no completion is rewarded."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config
from test_image_transforms import run
from test_vision import build, make_vision_dataset, make_vl_model, processor  # noqa: F401  (a module fixture)

from rlsd import RLSDTrainer
from rlsd.context import vision
from rlsd.context.transforms import BOX_COLUMN, TRANSFORMS, teacher_transform
from rlsd.core.gui_sd import digit_significance, gui_sd_token_loss
from rlsd.core.stages import STAGE_FIELDS
from rlsd.experiments.methods import CATALOGUE
from rlsd.plan import build_plan
from rlsd.step.batch import RLSDEntries
from rlsd.step.distill_term import DistillationTerm

BOXES = [[0, 0, 14, 14], [14, 14, 28, 28], [4, 4, 24, 24], [0, 14, 28, 28]]


def test_digit_significance_by_hand():
    pieces = ["<answer>", "1", "2", "3", ",", "4", "5", "</answer>"]
    assert digit_significance(pieces) == [1.0, 1.0, 2 / 3, 1 / 3, 1.0, 1.0, 0.5, 1.0]
    assert digit_significance(pieces, text_weight=0.25)[0] == 0.25
    # a number split over tokens: a token weighs as its first digit; a token may hold text and digits
    assert digit_significance(["x1", "23", ",", "7"], text_weight=0.0) == [1.0, 2 / 3, 0.0, 1.0]


def test_gui_sd_token_loss_by_hand():
    student = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    teacher = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    sampled = torch.tensor([1])  # p_T(y) = 0.5
    # beta = 1: KL(p_S || p_T) = 0.5 ln 2 + 0.25 ln(1/2) = 0.25 ln 2
    torch.testing.assert_close(
        gui_sd_token_loss(student, teacher, sampled, beta=1.0), torch.tensor([0.125 * math.log(2)])
    )
    # beta = 0.5: M = (0.375, 0.375, 0.25); JSD = 0.5 (KL(p_T||M) + KL(p_S||M)) = 0.25 ln(2/3) + 0.5 ln(4/3)
    jsd = 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    torch.testing.assert_close(gui_sd_token_loss(student, teacher, sampled, beta=0.5), torch.tensor([0.5 * jsd]))
    torch.testing.assert_close(  # the confidence is that of the sampled token: p_T(0) = 0.25
        gui_sd_token_loss(student, teacher, torch.tensor([0]), beta=1.0), torch.tensor([0.0625 * math.log(2)])
    )


def test_the_term_weights_each_token_by_significance_times_teacher_confidence(tokenizer, tmp_path):
    args = make_config(tmp_path, distill_loss="gui_sd", distill_jsd_beta=1.0, teacher="live")
    plan = build_plan(args, {name: getattr(args, name) for name in STAGE_FIELDS}, None, row_subsets=False)
    term = DistillationTerm(args=args, temperature=1.0, log=lambda *a: None, training=lambda: True,
                            accumulation=lambda: 1, decode_tokens=tokenizer.batch_decode)  # fmt: skip
    ids = torch.tensor([tokenizer("<answer>12,3</answer>")["input_ids"]])  # 6 tokens
    vocab = len(tokenizer)
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))  # the hidden states are the logits
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 6, vocab, generator=generator, requires_grad=True)
    teacher = torch.randn(1, 6, vocab, generator=generator)
    inputs = {"completion_ids": ids, "completion_mask": torch.ones_like(ids)}
    entries = RLSDEntries(distill_weight=torch.ones(1))
    loss = term.term(inputs, entries, plan, (student, head), (teacher, head), torch.zeros(1, 6))
    log_s, log_t = student.detach().log_softmax(-1)[0], teacher.log_softmax(-1)[0]
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    confidence = log_t.gather(-1, ids[0].unsqueeze(-1)).squeeze(-1).exp()
    significance = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0])  # <answer> 1 2 , 3 </answer>
    expected = (significance * confidence * reverse_kl).sum() / 6
    torch.testing.assert_close(loss.detach(), expected * plan.distill_coef)


def boxed_vision_dataset():
    """The vision test rows (four colours) with distinct boxes."""
    return make_vision_dataset().add_column(BOX_COLUMN, BOXES)


def test_the_loss_time_teacher_forward_sees_each_row_s_transformed_image(processor, tmp_path, monkeypatch):  # noqa: F811
    dataset = boxed_vision_dataset()
    seen = []
    original = vision.teacher_vision_kwargs

    def recording(batch, teacher_types, completion_length):
        kwargs = original(batch, teacher_types, completion_length)
        seen.append((batch["pixel_values"], kwargs["pixel_values"], kwargs["image_grid_thw"]))
        return kwargs

    monkeypatch.setattr(vision, "teacher_vision_kwargs", recording)
    # 8 rollout rows shuffled and split into 4 micro-batches of 2: the teacher's images must follow their rows
    trainer = build(processor, tmp_path, dataset=dataset, teacher="live", teacher_transform="draw_box",
                    distill_loss="gui_sd", policy_loss_coef=0.0, per_device_train_batch_size=2, num_generations=2,
                    gradient_accumulation_steps=4, privileged_source="none", teacher_template="{prompt}")  # fmt: skip
    trainer.train()
    student_patches = [processor.image_processor(images=[row["image"]], return_tensors="pt")["pixel_values"]
                       for row in dataset]  # fmt: skip
    drawn = [processor.image_processor(images=[run("draw_box", row["image"], row[BOX_COLUMN])], return_tensors="pt")
             for row in dataset]  # fmt: skip
    assert len(seen) == 4  # one loss-time teacher forward per micro-batch
    rows_seen = set()
    for student, teacher, grids in seen:
        assert student.shape == teacher.shape == (8, student.size(1))  # 2 rows x 4 patches
        assert grids.tolist() == [[1, 2, 2], [1, 2, 2]]
        for row in range(2):
            index = next(i for i, p in enumerate(student_patches) if torch.equal(p, student[4 * row : 4 * row + 4]))
            torch.testing.assert_close(teacher[4 * row : 4 * row + 4], drawn[index]["pixel_values"])
            assert not torch.equal(teacher[4 * row : 4 * row + 4], student[4 * row : 4 * row + 4])
            rows_seen.add(index)
    assert rows_seen == {0, 1, 2, 3}


def test_rows_first_round_trips_rows_with_several_or_no_images():
    grids = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])
    pixels = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)  # 4 + 8 + 4 patches
    packed = vision.rows_first({"pixel_values": pixels, "image_grid_thw": grids}, [1, 0, 2])
    assert packed["row_pixel_values"].shape == (3, 12, 3) and packed["row_image_grid_thw"].shape == (3, 2, 3)
    assert packed["row_image_grid_thw"][1].abs().sum() == 0  # the row without images
    flat = vision.flat_images(packed)
    torch.testing.assert_close(flat["pixel_values"], pixels)
    assert flat["image_grid_thw"].tolist() == grids.tolist()
    later = vision.flat_images({key: value[2:] for key, value in packed.items()})  # a micro-batch of the last row
    torch.testing.assert_close(later["pixel_values"], pixels[4:])


def zero_reward(completions, **kwargs):
    """No completion is ever rewarded."""
    return [0.0] * len(completions)


def test_gui_sd_distils_when_no_completion_is_rewarded(processor, tmp_path):  # noqa: F811
    model = make_vl_model(processor)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = RLSDTrainer(model, zero_reward, args=make_config(tmp_path, max_completion_length=6,
                          **CATALOGUE["gui-sd"]), train_dataset=boxed_vision_dataset(),
                          processing_class=processor)  # fmt: skip
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["reward"] == 0.0
    assert logs["rlsd/distill_loss"] > 0 and logs["loss"] > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_a_transform_that_changes_the_image_size_is_refused_before_training_naming_the_row(processor, tmp_path):  # noqa: F811
    @teacher_transform("test-shrink-third")
    def shrink_third(prompt, images):
        return prompt, [image.resize((14, 14)) if image.getpixel((0, 0)) == (20, 20, 220) else image
                        for image in images]  # fmt: skip

    try:
        with pytest.raises(ValueError, match=r"'test-shrink-third' changed the images of train_dataset row 2 from"):
            build(processor, tmp_path, teacher="live", teacher_transform="test-shrink-third", distill_loss="gui_sd")
    finally:
        TRANSFORMS.pop("test-shrink-third")


def test_box_hint_masks_around_the_box_and_outlines_it():
    from PIL import Image

    image = Image.new("RGB", (56, 28), (255, 255, 255))
    out = run("box_hint", image, [28, 0, 56, 28])
    assert out.getpixel((28, 10)) == (255, 0, 0)  # the outline, inside the box's left edge
    assert out.getpixel((42, 14))[0] > 240  # the box's centre stays white
    assert out.getpixel((2, 14))[0] < 60  # far from the box, faded towards black
    with pytest.raises(ValueError, match="row 0: the 'teacher_box' box"):
        run("box_hint", image, [28, 0, 60, 28])
