"""Distillation losses and privileged context sources inside RLSDTrainer (specification sections 3.1, 3.3, 3.4)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, make_model
from datasets import Dataset

from rlsd.config import DISTILL_LOSSES
from rlsd.context.templates import NO_SIBLING_TEXT, pick_siblings, render_teacher_prompts
from rlsd.core.distill import generalized_jsd

LOSSES = [name for name in DISTILL_LOSSES if name not in ("none", "trace")]
"""Every loss that reads the whole completion; `trace` distils only the tokens an annotating source labels (its
training step: `tests/test_trace.py`)."""


build = build_trainer


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def rollout(trainer, row_index: int = 0):
    """One group of the trainer's rollout on dataset row `row_index`, in training mode, as the loss receives it."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [make_dataset()[row_index]] * trainer.num_generations
    return rows, trainer._generate_and_score_completions(rows)


# ------------------------------------------------------------------------------------------ every loss, a step
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("loss", LOSSES)
def test_every_distillation_loss_runs_a_training_step(tokenizer, tmp_path, loss, loss_type):
    trainer = build(tokenizer, tmp_path, credit="grpo", distill_loss=loss, loss_type=loss_type, teacher="initial",
                    distill_coef=1.0, distill_topk=5)  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert math.isfinite(logged(trainer, "loss")[0])
    assert logged(trainer, "rlsd/distill_loss")[0] >= 0.0 or loss == "sdar"  # SDAR's g * Delta is signed
    assert logged(trainer, "rlsd/distill_token_frac")[0] == 1.0  # the answer source gives every row a context
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


# ------------------------------------------------------------------------------ the term equals its definition
def full_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """Completion-position logits from one plain forward returning the whole (B, T, V) tensor (the reference)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits
    return logits[:, -completion_ids.size(1) - 1 : -1].double() / temperature


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_term_and_its_gradient_equal_a_full_vocabulary_reference(tokenizer, tmp_path, beta):
    trainer = build(tokenizer, tmp_path, credit="grpo", distill_loss="jsd", distill_jsd_beta=beta, teacher="initial",
                    policy_loss_coef=0.0, distill_chunk_tokens=5, temperature=0.7)  # fmt: skip
    trainer.teacher.model.requires_grad_(False)
    _, batch = rollout(trainer)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    ours = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()

    completion = (batch["completion_ids"], batch["completion_mask"])
    student = full_logits(trainer.model, batch["prompt_ids"], batch["prompt_mask"], *completion, 0.7)
    with torch.no_grad():
        teacher_prompt = (batch["rlsd_teacher_prompt_ids"], batch["rlsd_teacher_prompt_mask"])
        teacher = full_logits(trainer.teacher.model, *teacher_prompt, *completion, 0.7)
    mask = batch["completion_mask"].double()
    expected = (generalized_jsd(student, teacher, beta) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    expected.backward()
    for (name, param), grad in zip(trainer.model.named_parameters(), ours, strict=True):
        torch.testing.assert_close(grad, param.grad.to(grad.dtype), rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in ours) > 0
    assert all(p.grad is None for p in trainer.teacher.model.parameters())  # the teacher gets no gradient


def test_policy_loss_weight_adds_trl_loss_to_the_term(tokenizer, tmp_path):
    """policy_loss_coef * TRL's loss + the term: with both weights, the loss is the sum of the two parts."""
    parts = {}
    for name, overrides in {"both": {}, "policy": {"distill_coef": 0.0}, "distill": {"policy_loss_coef": 0.0}}.items():
        trainer = build(tokenizer, tmp_path / name, credit="grpo", distill_loss="jsd", teacher="initial", **overrides)
        _, batch = rollout(trainer)
        parts[name] = trainer._compute_loss(trainer.model, batch).item()
    assert parts["both"] == pytest.approx(parts["policy"] + parts["distill"], rel=1e-6, abs=1e-8)
    assert parts["distill"] > 0


# --------------------------------------------------------------------------------------------------------- SDPG
def test_sdpg_anchor_is_zero_at_the_start_and_grows(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, credit="grpo", distill_loss="sdpg", teacher="live", max_steps=3,
                    learning_rate=5e-2)  # fmt: skip
    assert trainer.args.distill_coef == 0.001 and trainer.args.sdpg_ref_coef == 0.001  # the paper's beta, alpha
    assert trainer.reference is not None and trainer.teacher.model is None
    trainer.train()
    penalties = logged(trainer, "rlsd/ref_penalty")
    assert penalties[0] == pytest.approx(0.0, abs=1e-10)  # policy = reference before the first update
    assert penalties[-1] > 1e-4


def test_sdpg_positive_only_gates_rows_by_the_advantage(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, credit="grpo", distill_loss="sdpg", teacher="live",
                    distill_positive_only=True, sdpg_ref_coef=0.0)  # fmt: skip
    assert trainer.reference is None  # alpha = 0: no reference pass
    _, batch = rollout(trainer)
    positive = (batch["advantages"][:, 0] > 0).float()
    assert 0 < positive.sum() < len(positive)  # the parity reward splits the group
    torch.testing.assert_close(batch["rlsd_distill_weight"], positive)


# ------------------------------------------------------------------------------------------------- bad input
def test_unknown_distillation_loss_is_refused_listing_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="none, jsd, topk_jsd, teacher_top1, student_top1, sdpg"):
        make_config(tmp_path, distill_loss="kl")


def test_a_model_with_capped_logits_is_refused_for_distillation(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        build(tokenizer, tmp_path, model=model, credit="grpo", distill_loss="jsd", teacher="live")


# ------------------------------------------------------------------------------------------ sibling contexts
def test_pick_siblings_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, math.nan, 0.0, 0.0, 1.0, 0.5]
    assert pick_siblings(rewards, 2, 1.0) == [None, 0, 3, None, None, None, None, None, None, 8]
    assert pick_siblings(rewards[:4], 4, 1.0) == [3, 0, 0, 0]
    assert pick_siblings(rewards[8:], 2, 0.5) == [1, 0]
    with pytest.raises(ValueError, match="groups of 4"):
        pick_siblings(rewards, 4, 1.0)


def test_sibling_and_both_templates_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"uses \{sibling\}, which privileged_source='answer' does not fill"):
        make_config(tmp_path, teacher_template="{prompt} {answer} {sibling}")
    with pytest.raises(ValueError, match=r"must contain \{sibling\}"):
        make_config(tmp_path, privileged_source="sibling", teacher_template="{prompt}")
    with pytest.raises(ValueError, match=r"must contain \{answer\}"):
        make_config(tmp_path, privileged_source="both", teacher_template="{prompt} {sibling}")
    with pytest.raises(ValueError, match="answer, sibling, both"):
        make_config(tmp_path, privileged_source="peer")
    assert "{sibling}" in make_config(tmp_path, privileged_source="sibling").teacher_template


class FirstHalfCorrect:
    """Reward 1 for the first two completions of every group of four (a known sibling pattern), or 0 for all."""

    __name__ = "first_half_correct"

    def __init__(self) -> None:
        self.anyone_succeeds = True

    def __call__(self, completions, **kwargs):
        return [1.0 if self.anyone_succeeds and i % 4 < 2 else 0.0 for i in range(len(completions))]


def test_sibling_context_shows_a_successful_sibling_and_rows_without_one_get_no_signal(tokenizer, tmp_path):
    rows = [{"prompt": r["prompt"]} for r in make_dataset()]  # no answer column: the sibling source needs none
    reward = FirstHalfCorrect()
    trainer = build(tokenizer, tmp_path, reward=reward, dataset=Dataset.from_list(rows),
                    credit="opsd", teacher="live", privileged_source="sibling", teacher_template="{sibling}|{prompt}",
                    distill_loss="jsd", remove_unused_columns=True)  # fmt: skip
    inputs, batch = rollout(trainer)
    # completions 0 and 1 succeeded: 0 sees 1, 1 sees 0, 2 and 3 see 0
    texts = trainer.processing_class.batch_decode(
        [ids[m.bool()] for ids, m in zip(batch["completion_ids"], batch["completion_mask"], strict=True)],
        skip_special_tokens=True,
    )
    prompts = render_teacher_prompts([r["prompt"] for r in inputs], "{sibling}|{prompt}",
                                     {"sibling": [texts[1], texts[0], texts[0], texts[0]]})  # fmt: skip
    shown = trainer.processing_class.batch_decode(batch["rlsd_teacher_prompt_ids"], skip_special_tokens=True)
    assert shown == prompts
    assert batch["rlsd_has_context"].tolist() == [True] * 4
    assert trainer._compute_loss(trainer.model, batch).item() != 0.0

    # a group where nothing succeeds: no context anywhere, hence Delta = 0, no OPSD credit and no distillation
    reward.anyone_succeeds = False
    _, batch = rollout(trainer)
    assert batch["rlsd_has_context"].tolist() == [False] * 4
    shown = trainer.processing_class.batch_decode(batch["rlsd_teacher_prompt_ids"], skip_special_tokens=True)
    assert all(text.startswith(NO_SIBLING_TEXT) for text in shown)
    assert trainer._compute_loss(trainer.model, batch).item() == 0.0
    assert logged_metric(trainer, "rlsd/no_sibling_count") == 4.0
    assert logged_metric(trainer, "rlsd/distill_token_frac") == 0.0


def logged_metric(trainer, key: str) -> float:
    """The latest value of a metric not yet flushed to the log history."""
    return trainer._metrics["train"][key][-1]


def test_both_sources_keep_the_answer_when_no_sibling_succeeded(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, reward=lambda completions, **kw: [0.0] * len(completions),
                    credit="rlsd", teacher="live", privileged_source="both",
                    teacher_template="{answer}|{sibling}|{prompt}", distill_loss="jsd")  # fmt: skip
    inputs, batch = rollout(trainer)
    shown = trainer.processing_class.batch_decode(batch["rlsd_teacher_prompt_ids"], skip_special_tokens=True)
    assert shown == [f"{inputs[0]['solution']}|{NO_SIBLING_TEXT}|{inputs[0]['prompt']}"] * 4
    assert batch["rlsd_has_context"].all()
