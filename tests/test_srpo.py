"""SRPO (arXiv 2605.07274, reconstructed: `rlsd.core.srpo_rule`): role spans from the completion's tags, the token
weights pinned on hand-computed values, the config it needs, the corrupted-image pass through the teacher machinery,
and a training step on the tiny Qwen2-VL."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_trainer, make_config
from PIL import Image
from test_vision import (
    build,
    completions_of,
    make_vision_dataset,
    processor,  # noqa: F401  (a module fixture)
    rollout,
    teacher_pass,
)

from rlsd.context.transforms import apply_transform
from rlsd.core.rules import RuleParams, Signals, get_rule
from rlsd.core.srpo_rule import PERCEPTION, REASONING, role_char_spans

F64 = torch.float64
SRPO = {"credit": "srpo", "privileged_source": "none", "teacher_template": "{prompt}"}
ROLES = [PERCEPTION, PERCEPTION, REASONING, REASONING, 0, 0]


def srpo_signals(**overrides) -> Signals:
    """Two completions of 6 tokens, roles P P R R - -: A = +1 and -2 (its last token masked); s_t = 0, so
    c_t = Delta_t (the corrupted pass)."""
    values = dict(
        seq_advantages=torch.tensor([1.0, -2.0], dtype=F64),
        mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        teacher_logps=torch.tensor([[-0.3, -0.1, 0.1, -0.1, 0.5, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64),
        student_logps=torch.zeros(2, 6, dtype=F64),
        role_ids=torch.tensor([ROLES, ROLES]),
    )
    values.update(overrides)
    return Signals(**values)


# ------------------------------------------------------------------------------------------------- role spans
def test_role_spans_are_the_tagged_contents():
    text = "<perception>3+4</perception><think>4=4;3+4=7</think><answer>7</answer>"
    assert role_char_spans(text, "perception", "think") == [(12, 15, PERCEPTION), (35, 44, REASONING)]
    assert text[12:15] == "3+4" and text[35:44] == "4=4;3+4=7"
    assert role_char_spans("<p>1</p><p>2</p><think>x", "p", "think") == [
        (3, 4, PERCEPTION), (11, 12, PERCEPTION), (23, 24, REASONING),  # a truncated span runs to the end
    ]  # fmt: skip
    assert role_char_spans("<answer>7</answer>", "perception", "think") == []


# ----------------------------------------------------------------------------------------------- the weights
def test_weights_by_role_around_one_shared_baseline():
    adv, metrics = get_rule("srpo").fn(srpo_signals(), RuleParams(lam=0.5, clip=0.2))
    # row 0: z = -Delta on P (0.3, 0.1), +Delta on R (0.1, -0.1); b = 0.1; z - b = 0.2, 0, 0, -0.2
    # w = exp(.) = 1.2214 -> clipped 1.2, 1, 1, exp(-0.2) = 0.81873; multiplier 0.5 + 0.5 w; untagged tokens 1
    row0 = [1.1, 1.0, 1.0, 0.5 + 0.5 * math.exp(-0.2), 1.0, 1.0]
    # row 1: z = 1, 0, 0, 0; b = 0.25; w = exp(0.75) -> 1.2, exp(-0.25) = 0.7788 -> 0.8 (x3); A = -2
    row1 = [-2.2, -1.8, -1.8, -1.8, -2.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor([row0, row1], dtype=F64), rtol=0, atol=1e-12)
    assert metrics["srpo_perception_frac"] == pytest.approx(4 / 11)
    assert metrics["srpo_visual_dependency_mean"] == pytest.approx((0.3 + 0.1 + 1.0 + 0.0) / 4)
    assert metrics["srpo_consistency_mean"] == pytest.approx((0.1 - 0.1) / 4)
    assert metrics["srpo_untagged_frac"] == 0.0


def test_the_sign_of_a_is_kept_and_full_lambda_applies_the_clipped_weight():
    s = srpo_signals(teacher_logps=torch.tensor([[-9.0, 9.0, 9.0, -9.0, 0.0, 0.0]] * 2, dtype=F64))
    adv, _ = get_rule("srpo").fn(s, RuleParams(lam=1.0, clip=0.2))
    # z = 9, -9, 9, -9 (b = 0): the weights clip to 1.2, 0.8, 1.2, 0.8
    torch.testing.assert_close(adv[0], torch.tensor([1.2, 0.8, 1.2, 0.8, 1.0, 1.0], dtype=F64))
    assert (adv[1][:5] < 0).all() and (adv[0] > 0).all()


@pytest.mark.parametrize(("lam", "clip"), [(0.0, 0.2), (0.5, 0.0)])
def test_zero_lambda_or_clip_is_grpo(lam, clip):
    adv, _ = get_rule("srpo").fn(srpo_signals(), RuleParams(lam=lam, clip=clip))
    expected = torch.tensor([[1.0] * 6, [-2.0] * 5 + [0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    assert get_rule("srpo").grpo_when_lambda_zero


def test_a_completion_without_role_spans_keeps_a_and_is_counted():
    roles = torch.tensor([ROLES, [0] * 6])
    adv, metrics = get_rule("srpo").fn(srpo_signals(role_ids=roles), RuleParams(lam=0.5, clip=0.2))
    torch.testing.assert_close(adv[1], torch.tensor([-2.0] * 5 + [0.0], dtype=F64), rtol=0, atol=0)
    assert metrics["srpo_untagged_frac"] == 0.5


# ------------------------------------------------------------------------------------------------ the config
def test_srpo_needs_a_corruption_and_no_privileged_context(tmp_path):
    with pytest.raises(ValueError, match=r"credit='srpo' weighs perception tokens .* set teacher_transform"):
        make_config(tmp_path, **SRPO)
    with pytest.raises(ValueError, match=r"credit='srpo' with privileged_source='answer'.*privileged_source='none'"):
        make_config(tmp_path, credit="srpo", teacher_transform="blank_images")
    with pytest.raises(ValueError, match=r"srpo_perception_tag must be a tag name"):
        make_config(tmp_path, **SRPO, teacher_transform="blank_images", srpo_perception_tag="<p>")


def test_an_image_transform_on_a_text_dataset_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"'blank_images' changes only images, and neither train_dataset"):
        build_trainer(tokenizer, tmp_path, **SRPO, teacher_transform="blank_images")


def test_mask_digits_hides_the_numbers_of_text_and_chat_prompts():
    assert apply_transform("mask_digits", "Q: 3+45=", None, {}, "row 0") == ("Q: #+##=", None)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x7"}]}]
    masked, _ = apply_transform("mask_digits", chat, None, {}, "row 0")
    assert masked == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x#"}]}]


# ---------------------------------------------------------------------------------------------- in the trainer
def test_roles_reach_the_rule_as_token_labels(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, **SRPO, teacher_transform="mask_digits", srpo_perception_tag="p")
    ids = tokenizer(["<p>34</p><think>7</think><answer>7</answer>", "<think>1;2"], padding=True, padding_side="right")
    batch = {"completion_ids": torch.tensor(ids["input_ids"]), "completion_mask": torch.tensor(ids["attention_mask"])}
    roles = trainer.credit.role_ids(batch)
    pieces = [tokenizer.decode([t]) for t in ids["input_ids"][0]]
    assert pieces[:3] == ["<", "p", ">"] and pieces[9] == "<think>"  # one token per character, tags single tokens
    assert roles[0].tolist()[:12] == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 2, 0]
    assert roles[1].tolist()[:4] == [0, 2, 2, 2] and roles[1][4:].sum() == 0  # truncated; padding has no role


def test_the_second_pass_is_the_policy_on_the_blank_image_without_context(processor, tmp_path):  # noqa: F811
    trainer = build(processor, tmp_path, teacher="live", teacher_transform="blank_images", temperature=0.7,
                    per_device_train_batch_size=2, num_generations=2, **SRPO)  # fmt: skip
    dataset = make_vision_dataset()
    rows = [dataset[0], dataset[0], dataset[1], dataset[1]]
    output = rollout(trainer, rows)
    prompt_ids, prompt_mask, types, _ = trainer.teacher_inputs(rows, output)
    # the student's prompt tokens (the image's included), the blank images' pixels
    assert prompt_ids[prompt_mask.bool()].tolist() == output["prompt_ids"][output["prompt_mask"].bool()].tolist()
    blank = processor.image_processor(images=[Image.new("RGB", (28, 28))] * 4, return_tensors="pt")
    torch.testing.assert_close(types["pixel_values"], blank["pixel_values"])
    corrupted = teacher_pass(trainer, rows, output)
    student = trainer.score_rollout("student", output).logps
    mask = output["completion_mask"].bool()
    assert (corrupted - student)[mask].abs().max() > 1e-4  # the blank image changes the log-probs
    assert len(completions_of(output)) == 4


def test_a_training_step_on_images_logs_the_role_metrics(processor, tmp_path):  # noqa: F811
    trainer = build(processor, tmp_path, teacher="live", teacher_transform="noise_images", max_steps=2,
                    srpo_reasoning_tag="think", **SRPO)  # fmt: skip
    trainer.train()
    history = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    assert math.isfinite(history["loss"])
    assert "rlsd/srpo_untagged_frac" in history and "rlsd/adv_abs_mean" in history


def test_the_text_rule_runs_a_training_step(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, **SRPO, teacher="live", teacher_transform="mask_digits")
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert math.isfinite(entry["loss"]) and "rlsd/srpo_untagged_frac" in entry
