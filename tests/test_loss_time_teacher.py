"""A credit rule with a distillation loss: the rule's teacher and student log-probs come from one point in training.

With a live teacher shown the plain prompt (`privileged_source="none"`), the teacher *is* the student, so Delta must be
0 whatever the precision, the number of iterations per rollout or the optimizer steps in between."""

from __future__ import annotations

import pytest
from conftest import build_trainer, make_dataset
from transformers import set_seed

from rlsd.step.assign import CreditAssembler
from rlsd.step.scorer import Scorer

SAME_TEACHER = dict(credit="rlsd", teacher="live", privileged_source="none", rlsd_lambda_decay_steps=0)


@pytest.fixture
def deltas(monkeypatch):
    """Every credit computation's max |tau - s| over completion tokens, in order."""
    seen: list[float] = []
    original = CreditAssembler.assign

    def spy(self, rule, entries, batch, student_logps, mode):
        mask = batch["completion_mask"].bool()
        seen.append((entries.teacher_logps - student_logps)[mask].abs().max().item())
        return original(self, rule, entries, batch, student_logps, mode)

    monkeypatch.setattr(CreditAssembler, "assign", spy)
    return seen


def test_credit_with_a_distillation_loss_over_two_iterations_pairs_teacher_and_student_of_one_step(
    tokenizer, tmp_path, deltas
):
    """num_iterations=2: the second pass over a rollout comes after an optimizer step, so TRL keeps the rollout's old
    log-probs as s; tau must be the rollout's too (the loss-time teacher had moved: Delta reached 1.7 nat)."""
    trainer = build_trainer(
        tokenizer, tmp_path, **SAME_TEACHER, distill_loss="jsd", distill_coef=0.01, num_iterations=2, max_steps=4,
        learning_rate=5e-2,
    )  # fmt: skip
    trainer.train()
    assert len(deltas) == 2  # one credit per rollout, computed at rollout time from TRL's old log-probs
    assert max(deltas) < 1e-5


def test_credit_without_old_logps_still_reads_the_loss_time_teacher_pass(tokenizer, tmp_path, deltas, monkeypatch):
    """One iteration: the rule takes its teacher log-probs from the distillation's loss-time pass (no second teacher
    forward), and they equal the student's."""
    trainer = build_trainer(tokenizer, tmp_path, **SAME_TEACHER, distill_loss="jsd", max_steps=2)
    calls = []
    original = Scorer.teacher_rows
    monkeypatch.setattr(Scorer, "teacher_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer.train()
    assert calls == [] and len(deltas) == 2
    assert max(deltas) < 1e-5


def test_loss_time_teacher_runs_under_the_students_autocast(tokenizer, tmp_path, deltas):
    """bf16=True with fp32 weights (TRL's defaults): the student's loss forward runs under autocast, so the loss-time
    teacher pass must too; outside it Delta was 1.4e-3 and the distillation loss nonzero with teacher == student."""
    trainer = build_trainer(tokenizer, tmp_path, **SAME_TEACHER, distill_loss="jsd", bf16=True,
                            per_device_train_batch_size=8)  # fmt: skip
    assert trainer.plan.teacher_at_loss
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    dataset = make_dataset()
    set_seed(0)
    output = trainer._generate_and_score_completions([dataset[i] for i in (0, 1) for _ in range(4)])
    trainer._compute_loss(trainer.model, output)
    assert len(deltas) == 1 and deltas[0] < 1e-6
    assert abs(trainer._metrics["train"]["rlsd/distill_loss"][-1]) < 1e-6
