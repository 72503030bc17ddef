"""Issue 14's last follow-ups: Sparse-to-Dense's stage schedule (`rlsd.core.stages`, `RLSDConfig.stages`) and MAD-OPD's
confidence-weighted sum over several teachers (`rlsd.core.distill.mad_opd_*`), with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_trainer, make_config, make_model

from rlsd.core.distill import generalized_jsd, mad_opd_token_loss, mad_opd_weights, teacher_confidence
from rlsd.core.stages import reachable, stage_index, stage_values
from rlsd.infra.validate import ConfigError
from rlsd.teachers import ExternalTeacher

WARMUP_OPD_GRPO = [
    {"until_step": 1, "credit": "grpo", "distill_loss": "jsd", "distill_jsd_beta": 0.0, "policy_loss_coef": 0.0},
    {"until_step": 2, "credit": "opsd", "distill_loss": "none"},
    {"credit": "grpo", "distill_loss": "none"},
]
"""Sparse-to-Dense: a forward-KL warm-up (step 1), OPD (step 2), then GRPO to the end."""


# ------------------------------------------------------------------------------------------ stages, by hand
def test_the_active_stage_at_each_step_by_hand():
    stages = [{"until_step": 2}, {"until_step": 5}, {}]
    assert [stage_index(stages, k) for k in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert reachable(stages) == [0, 1, 2]  # the last stage runs to the end: the config's own values never apply
    closed = [{"until_step": 1}, {"until_step": 3}]
    assert [stage_index(closed, k) for k in range(1, 6)] == [0, 1, 1, 2, 2]  # 2 = the config's own values
    assert reachable(closed) == [0, 1, 2]


def test_a_stage_overrides_only_its_own_fields_over_the_config_values():
    base = {"credit": "rlsd", "distill_loss": "none", "policy_loss_coef": 1.0}
    stages = [{"until_step": 3, "distill_loss": "jsd"}, {"until_step": 4, "credit": "opsd"}]
    assert stage_values(stages, 0, base) == {"credit": "rlsd", "distill_loss": "jsd", "policy_loss_coef": 1.0}
    # the second stage does not inherit the first stage's loss: unnamed fields keep the config's values
    assert stage_values(stages, 1, base) == {"credit": "opsd", "distill_loss": "none", "policy_loss_coef": 1.0}
    assert stage_values(stages, 2, base) == base


def test_stages_from_a_json_string_and_the_default_coefficient_of_a_stage_loss(tmp_path):
    args = make_config(tmp_path, stages='[{"until_step": 2, "distill_loss": "sdpg"}, {"distill_loss": "jsd"}]')
    assert args.stages == [
        {"until_step": 2, "distill_loss": "sdpg", "distill_coef": 0.001},
        {"distill_loss": "jsd", "distill_coef": 1.0},
    ]
    assert make_config(tmp_path, stages=[]).stages is None


@pytest.mark.parametrize(
    ("stages", "where", "what"),
    [
        ([{"until_step": 2}, {"until_step": 2}], r"--stages\[1\]\.until_step", "not an integer above 2"),
        ([{"until_step": 3}, {"until_step": 1}], r"--stages\[1\]\.until_step", "not an integer above 3"),
        ([{"until_step": 0}], r"--stages\[0\]\.until_step", "not an integer above 0"),
        ([{"credit": "grpo"}, {"until_step": 4}], r"--stages\[0\]\.until_step", "is missing"),
        ([{"until_step": 2, "learning_rate": 1.0}], r"--stages\[0\]\.learning_rate", "not a field a stage may set"),
        ([{"until_step": 2}, {"credit": "ppo"}], r"--stages\[1\]\.credit", "not a known credit rule"),
        ([{"until_step": 2, "distill_loss": "kl"}], r"--stages\[0\]\.distill_loss", "not a known loss"),
        ([{"until_step": 2, "distill_jsd_beta": 1.5}], r"--stages\[0\]\.distill_jsd_beta", r"\[0, 1\]"),
        ([{"until_step": 2, "policy_loss_coef": -1.0}], r"--stages\[0\]\.policy_loss_coef", ">= 0"),
        ([{"until_step": 2, "distill_topk": 0}], r"--stages\[0\]\.distill_topk", ">= 1"),
        ([{"until_step": 2, "distill_tail": "yes"}], r"--stages\[0\]\.distill_tail", "true or false"),
        ([{"until_step": 2}, {"credit": "antisd"}], r"--stages\[1\]\.credit", "keeps state"),
        ("[{not json", "--stages", "not valid JSON"),
        ({"until_step": 2}, "--stages", "must be a list of dicts"),
    ],
)
def test_bad_stage_lists_are_refused_naming_the_stage_and_the_field(tmp_path, stages, where, what):
    with pytest.raises(ConfigError, match=f"{where}.*{what}"):
        make_config(tmp_path, stages=stages)


def test_a_stage_rule_the_config_options_do_not_allow_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--stages\[0\]\.credit"):  # opsd does not honour negative_only
        make_config(tmp_path, rlsd_negative_only=True, stages=[{"until_step": 2, "credit": "opsd"}])
    with pytest.raises(ConfigError, match=r"--credit.*runs after the stages"):  # antisd reached after the stages
        make_config(tmp_path, credit="antisd", stages=[{"until_step": 2, "credit": "grpo"}])
    make_config(tmp_path, credit="antisd", stages=[{"credit": "grpo"}])  # never reached: allowed


# --------------------------------------------------------------------------------------------- stages, trainer
def test_the_teacher_is_built_when_any_reachable_stage_needs_it(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", stages=[{"until_step": 1, "credit": "opsd"}])
    assert trainer.teacher is not None and trainer.plan.stage == 0 and trainer.plan.credit == "opsd"
    assert trainer.args.credit == "grpo"  # the config is never changed by a stage
    # the default credit ("rlsd") is never reached after an open last stage: no teacher
    trainer = build_trainer(tokenizer, tmp_path, stages=[{"credit": "grpo"}])
    assert trainer.teacher is None and trainer.plan.rule.name == "grpo"


def test_sparse_to_dense_three_stages_train_with_the_distillation_term_only_in_its_stage(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, max_steps=3, stages=WARMUP_OPD_GRPO, temperature=0.7)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "rlsd/stage" in entry]
    assert [entry["rlsd/stage"] for entry in steps] == [0.0, 1.0, 2.0]
    assert ["rlsd/distill_loss" in entry for entry in steps] == [True, False, False]  # the warm-up's KL only
    assert steps[0]["rlsd/distill_loss"] > 0
    assert ["rlsd/lambda" in entry for entry in steps] == [False, True, False]  # only OPD's rule reads the teacher
    assert all(math.isfinite(entry["loss"]) for entry in steps)
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.plan.stage == 2 and trainer.plan.credit == "grpo" and trainer.plan.distill_fn is None
    assert trainer.args.credit == "rlsd"  # the config's own values are never changed by a stage


def test_resuming_a_staged_run_enters_the_stage_of_the_resumed_step(tokenizer, tmp_path):
    first = build_trainer(tokenizer, tmp_path, max_steps=2, stages=WARMUP_OPD_GRPO, save_strategy="steps",
                          save_steps=2)  # fmt: skip
    first.train()
    resumed = build_trainer(tokenizer, tmp_path, max_steps=3, stages=WARMUP_OPD_GRPO)
    assert resumed.plan.stage == 0  # before training: the stage of step 1
    resumed.train(resume_from_checkpoint=True)
    stages = [entry["rlsd/stage"] for entry in resumed.state.log_history if "rlsd/stage" in entry]
    assert stages[-1] == 2.0 and resumed.state.global_step == 3 and resumed.plan.credit == "grpo"


def test_sparse_to_dense_with_an_external_teacher(tokenizer, tmp_path):
    """The paper's setting: a frozen external teacher shown the plain prompt, KL warm-up, OPD, then GRPO."""
    from rlsd.experiments.tiny import build_tiny_qwen2

    folder = tmp_path / "teacher"
    teacher = build_tiny_qwen2(tokenizer, hidden_size=48, num_layers=3, num_heads=2, intermediate_size=96, seed=7)
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trainer = build_trainer(
        tokenizer, tmp_path / "run", model=make_model(tokenizer), max_steps=3, stages=WARMUP_OPD_GRPO,
        teacher_model=str(folder), privileged_source="none",
    )  # fmt: skip
    assert isinstance(trainer.teacher, ExternalTeacher)
    teacher_before = [p.detach().clone() for p in trainer.teacher.model.parameters()]
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "rlsd/stage" in entry]
    assert [entry["rlsd/stage"] for entry in steps] == [0.0, 1.0, 2.0]
    assert steps[0]["rlsd/distill_loss"] > 0 and "rlsd/distill_loss" not in steps[1]
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.model.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------- MAD-OPD
def two_teachers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token, vocabulary 2, sampled token 0: teacher 1 p = (0.5, 0.5), teacher 2 p = (0.8, 0.2); the student
    p_S = (0.5, 0.5)."""
    teachers = torch.log(torch.tensor([[[0.5, 0.5]], [[0.8, 0.2]]]))
    student = torch.zeros(1, 2, requires_grad=True)
    return student, teachers, torch.tensor([0])


def test_mad_opd_confidences_by_hand():
    _, teachers, sampled = two_teachers()
    torch.testing.assert_close(teacher_confidence(teachers, sampled), torch.log(torch.tensor([[0.5], [0.8]])))
    neg_entropy = torch.tensor([[math.log(0.5)], [0.8 * math.log(0.8) + 0.2 * math.log(0.2)]])
    torch.testing.assert_close(teacher_confidence(teachers, sampled, "neg_entropy"), neg_entropy)
    with pytest.raises(ValueError, match="unknown MAD-OPD confidence"):
        teacher_confidence(teachers, sampled, "votes")


def test_mad_opd_weights_by_hand():
    _, teachers, sampled = two_teachers()
    confidence = teacher_confidence(teachers, sampled)
    # temperature 1: a_m = p_m(y) / sum_n p_n(y) = (0.5, 0.8) / 1.3
    torch.testing.assert_close(mad_opd_weights(confidence), torch.tensor([[5 / 13], [8 / 13]]))
    # temperature 0.5: a_m proportional to p_m(y)^2 = (0.25, 0.64) / 0.89
    torch.testing.assert_close(mad_opd_weights(confidence, 0.5), torch.tensor([[0.25 / 0.89], [0.64 / 0.89]]))
    torch.testing.assert_close(mad_opd_weights(confidence, 1e6), torch.full((2, 1), 0.5))  # the plain average
    with pytest.raises(ValueError, match="temperature"):
        mad_opd_weights(confidence, 0.0)


def test_mad_opd_loss_is_the_confidence_weighted_sum_by_hand():
    student, teachers, sampled = two_teachers()
    loss, weights = mad_opd_token_loss(lambda s, t: generalized_jsd(s, t, beta=0.0), student, teachers, sampled)
    # forward KL to p_S = (0.5, 0.5): teacher 1 gives 0, teacher 2 gives 0.8 log 1.6 + 0.2 log 0.4
    kl_2 = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    torch.testing.assert_close(loss, torch.tensor([8 / 13 * kl_2]))
    torch.testing.assert_close(weights, torch.tensor([[5 / 13], [8 / 13]]))
    loss.sum().backward()  # d/dz_S of sum_m a_m KL(p_m || softmax z) = p_S - sum_m a_m p_m (a held fixed)
    mixed = 5 / 13 * torch.tensor([0.5, 0.5]) + 8 / 13 * torch.tensor([0.8, 0.2])
    torch.testing.assert_close(student.grad, (torch.tensor([0.5, 0.5]) - mixed).unsqueeze(0))


# ------------------------------------------------------------------------------------------ MAD-OPD, trainer
@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, tokenizer):
    """Two different tiny teachers (hidden 48, 3 layers; seeds 7 and 8) saved with the student's tokenizer."""
    from rlsd.experiments.tiny import build_tiny_qwen2

    folders = []
    for seed in (7, 8):
        folder = tmp_path_factory.mktemp(f"teacher{seed}")
        build_tiny_qwen2(tokenizer, hidden_size=48, num_layers=3, num_heads=2, intermediate_size=96, seed=seed)\
            .save_pretrained(folder)  # fmt: skip
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


MAD = {"credit": "grpo", "distill_loss": "jsd", "policy_loss_coef": 0.0, "privileged_source": "none"}


def test_mad_opd_options_are_parsed_and_checked(tmp_path):
    assert make_config(tmp_path, teacher_model="a", mad_opd_teachers="b, c", **MAD).mad_opd_teachers == ["b", "c"]
    assert make_config(tmp_path, teacher_model="a", mad_opd_teachers='["b"]', **MAD).mad_opd_teachers == ["b"]
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*teacher_model is not"):
        make_config(tmp_path, mad_opd_teachers=["b"], **MAD)
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*distill_loss is 'none'"):
        make_config(tmp_path, teacher_model="a", mad_opd_teachers=["b"], **{**MAD, "distill_loss": "none"})
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*credit='rlsd'"):
        make_config(tmp_path, teacher_model="a", mad_opd_teachers=["b"], **{**MAD, "credit": "rlsd"})
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*stages"):
        make_config(tmp_path, teacher_model="a", mad_opd_teachers=["b"], stages=[{"credit": "grpo"}], **MAD)
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*not valid JSON"):
        make_config(tmp_path, teacher_model="a", mad_opd_teachers='["b"', **MAD)
    with pytest.raises(ConfigError, match=r"--mad_opd_teachers.*list of model names"):
        make_config(tmp_path, teacher_model="a", mad_opd_teachers="[1]", **MAD)
    with pytest.raises(ConfigError, match="--mad_opd_confidence"):
        make_config(tmp_path, mad_opd_confidence="votes")
    with pytest.raises(ConfigError, match="--mad_opd_temperature"):
        make_config(tmp_path, mad_opd_temperature=0.0)


@pytest.mark.parametrize("confidence", ["sampled_logp", "neg_entropy"])
def test_mad_opd_trains_with_two_teachers_and_logs_weights_summing_to_one(
    tokenizer, tmp_path, teacher_dirs, confidence
):
    trainer = build_trainer(tokenizer, tmp_path, teacher_model=teacher_dirs[0], mad_opd_teachers=teacher_dirs[1:],
                            mad_opd_confidence=confidence, **MAD)  # fmt: skip
    assert [t.name for t in trainer.mad_teachers] == teacher_dirs[1:]
    frozen = [p.detach().clone() for t in (trainer.teacher, *trainer.mad_teachers) for p in t.model.parameters()]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "rlsd/mad_weight_0" in e)
    assert entry["rlsd/mad_weight_0"] + entry["rlsd/mad_weight_1"] == pytest.approx(1.0)
    assert 0 < entry["rlsd/mad_weight_0"] < 1 and entry["rlsd/distill_loss"] > 0
    after = [p for t in (trainer.teacher, *trainer.mad_teachers) for p in t.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))  # the teachers did not learn
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_mad_opd_with_two_copies_of_one_teacher_equals_distilling_from_it(tokenizer, tmp_path, teacher_dirs):
    """Equal confidences give a = (1/2, 1/2) and 1/2 D + 1/2 D = D: the term, hence the step, is the single
    teacher's."""
    single = build_trainer(tokenizer, tmp_path / "one", teacher_model=teacher_dirs[0], **MAD)
    single.train()
    double = build_trainer(tokenizer, tmp_path / "two", teacher_model=teacher_dirs[0],
                           mad_opd_teachers=teacher_dirs[:1], **MAD)  # fmt: skip
    double.train()
    first = next(e for e in double.state.log_history if "rlsd/mad_weight_0" in e)
    assert first["rlsd/mad_weight_0"] == first["rlsd/mad_weight_1"] == 0.5
    one = next(e for e in single.state.log_history if "rlsd/distill_loss" in e)
    assert first["rlsd/distill_loss"] == pytest.approx(one["rlsd/distill_loss"], rel=1e-6)
    for a, b in zip(single.model.parameters(), double.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("confidence", ["sampled_logp", "neg_entropy"])
def test_mad_opd_term_and_its_gradient_equal_a_full_vocabulary_reference(
    tokenizer, tmp_path, teacher_dirs, confidence
):
    """The trainer's chunked two-teacher term against the formula on whole (B, T, V) logits of plain forwards:
    sum_m a_m,t JSD(p_m,t, p_S,t) with a = softmax_m(c_m,t / 0.5), token mean over the completion tokens."""
    from test_family import full_logits, rollout

    trainer = build_trainer(tokenizer, tmp_path, teacher_model=teacher_dirs[0], mad_opd_teachers=teacher_dirs[1:],
                            mad_opd_confidence=confidence, mad_opd_temperature=0.5, distill_chunk_tokens=5,
                            temperature=0.7, **MAD)  # fmt: skip
    _, batch = rollout(trainer)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    ours = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()

    completion = (batch["completion_ids"], batch["completion_mask"])
    student = full_logits(trainer.model, batch["prompt_ids"], batch["prompt_mask"], *completion, 0.7)
    with torch.no_grad():
        prompt = (batch["rlsd_teacher_prompt_ids"], batch["rlsd_teacher_prompt_mask"])
        teachers = torch.stack(
            [full_logits(t.model, *prompt, *completion, 0.7) for t in (trainer.teacher, *trainer.mad_teachers)]
        )  # (M, B, T, V)
    log_p = torch.log_softmax(teachers, -1)
    if confidence == "sampled_logp":
        c = log_p.gather(-1, batch["completion_ids"].expand(2, -1, -1).unsqueeze(-1)).squeeze(-1)
    else:
        c = (log_p.exp() * log_p).sum(-1)
    a = torch.softmax(c / 0.5, dim=0)
    per_token = sum(a[m] * generalized_jsd(student, teachers[m], 0.5) for m in range(2))
    mask = batch["completion_mask"].double()
    expected = (per_token * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert 0.02 < (a[0] * mask).sum() / mask.sum() < 0.98  # the two teachers really are weighted differently
    expected.backward()
    for (name, param), grad in zip(trainer.model.named_parameters(), ours, strict=True):
        torch.testing.assert_close(grad, param.grad.to(grad.dtype), rtol=1e-4, atol=1e-6, msg=name)
