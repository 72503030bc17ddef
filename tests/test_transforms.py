"""Teacher-side input transforms: the teacher is shown another input than the student (another prompt, another image),
through the same processor path as the student's, while the student's rollout is untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset
from PIL import Image
from test_vision import (
    build,
    completions_of,
    direct_teacher_logps,
    make_vision_dataset,
    processor,  # noqa: F401  (a module fixture)
    rollout,
    teacher_pass,
)

from rlsd.context.transforms import TRANSFORMS, teacher_transform


@pytest.fixture
def hint_transform():
    """A text transform registered from user code: the teacher's prompt gets a hint appended."""

    @teacher_transform("test-hint")
    def hint(prompt, images):
        return f"{prompt} (hint)", images

    yield hint
    TRANSFORMS.pop("test-hint")


def test_unknown_transform_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_transform='nope' is not one of .*blank_images"):
        make_config(tmp_path, teacher_transform="nope")


def test_a_user_transform_changes_the_teacher_prompt_only(tokenizer, tmp_path, hint_transform):
    trainer = build_trainer(tokenizer, tmp_path, credit="rlsd", teacher_transform="test-hint",
                            rlsd_lambda_decay_steps=0)  # fmt: skip
    trainer.model.train()
    rows = [make_dataset()[1]] * 4
    output = rollout(trainer, rows)
    prompt = rows[0]["prompt"]
    student = tokenizer.decode(output["prompt_ids"][0][output["prompt_mask"][0].bool()], skip_special_tokens=True)
    assert student == prompt  # the student's rollout is TRL's, untouched
    ids, mask, _, _ = trainer.teacher_inputs(rows, output)
    shown = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    expected = trainer.args.teacher_template.format(prompt=f"{prompt} (hint)", answer=rows[0]["solution"])
    assert shown == expected


def test_blank_images_reach_the_teacher_through_the_processor(processor, tmp_path):  # noqa: F811
    trainer = build(processor, tmp_path, teacher="live", teacher_transform="blank_images", temperature=0.7,
                    per_device_train_batch_size=2, num_generations=2)  # fmt: skip
    dataset = make_vision_dataset()
    rows = [dataset[0], dataset[0], dataset[1], dataset[1]]
    output = rollout(trainer, rows)
    logps = teacher_pass(trainer, rows, output)
    for index, completion in enumerate(completions_of(output)):
        blank = {**rows[index], "image": Image.new("RGB", (28, 28))}
        expected = direct_teacher_logps(trainer.model, processor, blank, completion, temperature=0.7)
        torch.testing.assert_close(logps[index, : len(completion)].double(), expected, atol=1e-5, rtol=1e-5)
        seen = direct_teacher_logps(trainer.model, processor, rows[index], completion, temperature=0.7)
        assert (expected - seen).abs().max() > 1e-4, "the blank image does not change the teacher: test is vacuous"
