"""Privileged contexts computed after the rewards, with a model: the extension point of generated contexts.

A source registered from user code (here, a reflection on each failed completion written by the policy) reads the
rollout's completion texts and rewards and calls `RolloutView.generate`; its new template field is known once the
source is registered, and the teacher sees what it generated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset

from rlsd.context.prompts import RolloutTap, TeacherPrompts
from rlsd.context.sources import SOURCES, Context, PrivilegedSource, RolloutView, privileged_source


@pytest.fixture
def reflection_source():
    """A source that asks the policy why each failed completion failed and shows the teacher its answer."""

    @privileged_source
    class ReflectionSource(PrivilegedSource):
        name = "test-reflection"
        fills = ("critique",)  # a field no built-in source fills (the built-in "reflection" fills {reflection})
        default_template = "{prompt} Critique: {critique} Answer:"
        needs_completions = True
        needs_generator = True
        calls: ClassVar[list[dict]] = []

        def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
            failed = [i for i in rows if view.rewards[view.offset + i] <= 0]
            asks = [f"Why is {view.completion_texts[view.offset + i]!r} wrong?" for i in failed]
            texts = view.generate(asks)
            type(self).calls.append({"rewards": list(view.rewards), "asks": asks, "texts": texts})
            written = dict(zip(failed, texts, strict=True))
            return Context({"critique": [written.get(i, "") for i in rows]}, [i in written for i in rows])

    yield ReflectionSource
    SOURCES.pop(ReflectionSource.name)


def test_a_template_field_of_a_user_source_is_known_only_once_it_is_registered(tmp_path, reflection_source):
    config = make_config(tmp_path, privileged_source="test-reflection")
    assert config.teacher_template == reflection_source.default_template
    with pytest.raises(ValueError, match=r"privileged_source='answer' does not fill"):
        make_config(tmp_path, teacher_template="{prompt} {critique} {answer}")
    SOURCES.pop("test-reflection")
    try:
        with pytest.raises(ValueError, match=r"unknown field\(s\) \{critique\}"):
            make_config(tmp_path, teacher_template="{prompt} {critique} {answer}")
    finally:
        SOURCES["test-reflection"] = reflection_source


def test_a_source_generates_its_context_after_the_rewards_and_the_teacher_sees_it(
    tokenizer, tmp_path, reflection_source
):
    trainer = build_trainer(tokenizer, tmp_path, credit="rlsd", privileged_source="test-reflection",
                            rlsd_lambda_decay_steps=0)  # fmt: skip
    trainer.model.train()
    inputs = [make_dataset()[0]] * 4
    output = trainer._generate_and_score_completions(inputs)
    (call,) = reflection_source.calls  # one context, so one generation, per rollout
    rewards = call["rewards"]
    assert len(rewards) == 4 and 0 < sum(rewards) < 4  # the parity reward: some rows failed, some did not
    assert len(call["texts"]) == len(call["asks"]) == sum(r <= 0 for r in rewards)
    failed = [i for i, r in enumerate(rewards) if r <= 0]
    assert output["rlsd_has_context"].tolist() == [r <= 0 for r in rewards]
    reflection_source.calls.clear()
    with pytest.raises(ValueError, match="reads the rollout's rewards"):
        trainer.teacher_inputs(inputs, output)
    tap = RolloutTap(rewards=torch.tensor(rewards))
    prompt_ids, prompt_mask, _, _ = trainer.teacher_inputs(inputs, output, rollout=tap)
    (call,) = reflection_source.calls
    for row, text in zip(failed, call["texts"], strict=True):
        shown = tokenizer.decode(prompt_ids[row][prompt_mask[row].bool()], skip_special_tokens=True)
        assert shown == f"{inputs[row]['prompt']} Critique: {text} Answer:"


def test_a_training_run_with_a_generating_source_steps(tokenizer, tmp_path, reflection_source):
    trainer = build_trainer(tokenizer, tmp_path, credit="rlsd", privileged_source="test-reflection", max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and len(reflection_source.calls) == 2


def test_the_teacher_prompt_is_built_from_the_prompt_the_rollout_used(tokenizer, tmp_path, monkeypatch):
    """The rollout hands the trainer the prompts it sent to the model (those its reward functions see: with an
    environment, its `reset` observation is part of them); the teacher's prompt is that prompt plus the privileged
    context, whatever the dataset row says."""
    seen = []

    def spy_reward(completions, **kwargs):
        seen.append(list(kwargs["prompts"]))
        return [float(i % 2) for i in range(len(completions))]

    trainer = build_trainer(tokenizer, tmp_path, reward=spy_reward, credit="rlsd", rlsd_lambda_decay_steps=0)
    trainer.model.train()
    rows = [make_dataset()[2]] * 4
    taps = []
    original = TeacherPrompts.build

    def spy_build(self, inputs, output, mode="train", rows=None, rollout=None, **kwargs):
        taps.append(rollout)
        return original(self, inputs, output, mode, rows, rollout, **kwargs)

    monkeypatch.setattr(TeacherPrompts, "build", spy_build)
    output = trainer._generate_and_score_completions(rows)
    monkeypatch.undo()
    (tap,) = taps
    assert tap.prompts == seen[0] == [row["prompt"] for row in rows]
    observed = RolloutTap(prompts=[f"{p} Observation: 7." for p in tap.prompts], rewards=tap.rewards)
    ids, mask, _, _ = trainer.teacher_inputs(rows, output, rollout=observed)
    shown = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    template = trainer.args.teacher_template
    assert shown == template.format(prompt=f"{rows[0]['prompt']} Observation: 7.", answer=rows[0]["solution"])
    ids, mask, _, _ = trainer.teacher_inputs(rows, output)  # no rollout given: the dataset row's prompt
    shown = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    assert shown == template.format(prompt=rows[0]["prompt"], answer=rows[0]["solution"])
