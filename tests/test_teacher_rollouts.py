"""Teacher rollouts (issue 14, item 4): BRTS's selection and top-K trajectory loss, PBSD's DPO-style loss, by hand,
and a training step of each with the self-teacher and with an external teacher."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, parity_reward

from rlsd.core.rollout_losses import (
    Candidates,
    chunked_sampled_logps,
    chunked_topk_kl,
    completion_mask,
    distinct_rows,
    pair_index,
    pbsd_loss,
    select_brts,
    select_rollout,
    teacher_topk,
    topk_trajectory_kl,
    trajectory_alignment,
)
from rlsd.infra.validate import ConfigError, RewardError
from rlsd.step.rollout_term import TeacherRolloutTerm

NAN = math.nan


def logged(trainer, key: str) -> float:
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def logged_keys(trainer) -> set[str]:
    return {key for entry in trainer.state.log_history for key in entry}


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------- selection, by hand
def test_select_rollout_takes_a_correct_trajectory_first_then_the_most_aligned():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    alignment = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.1, 0.7, 0.3, 0.2]])
    choice, correct = select_rollout(rewards, alignment)
    # prompt 0: the most aligned trajectory (0.9) is wrong; of the correct ones (1, 2) the more aligned is 2
    # prompt 1: none correct: the most aligned of all
    assert choice.tolist() == [2, 1] and correct.tolist() == [True, False]


def test_select_rollout_with_graded_and_abstaining_rewards():
    rewards = torch.tensor([[0.2, 0.7, 0.7], [NAN, 0.5, NAN], [NAN, NAN, NAN], [-1.0, -0.5, -0.5]])
    alignment = torch.tensor([[0.9, 0.1, 0.4], [1.0, 0.0, 0.9], [0.2, 0.6, 0.4], [0.9, 0.1, 0.3]])
    choice, correct = select_rollout(rewards, alignment)
    # the best reward first (0.7 twice: the more aligned), NaN abstains (never beats a number), all NaN: the most
    # aligned; a negative best is the best but not correct
    assert choice.tolist() == [2, 1, 1, 2]
    assert correct.tolist() == [True, True, False, False]


def test_brts_retry_and_all_wrong_paths_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    alignment = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.3, 0.8]])
    retry_rewards = torch.tensor([[NAN, NAN], [0.0, 1.0], [0.0, 0.0]])  # prompt 0 was not retried
    retry_alignment = torch.tensor([[-math.inf, -math.inf], [0.9, 0.5], [0.6, 0.7]])
    choice = select_brts(rewards, alignment, retry_rewards, retry_alignment)
    # 0: correct at once (index 0, though 1 is more aligned); 1: the retry's correct one (N + 1 = 3, though 2 is
    # more aligned); 2: still none correct: the most aligned of all 2N, 0.8 at index 1, kept and marked wrong
    assert choice.index.tolist() == [0, 3, 1]
    assert choice.correct.tolist() == [True, True, False]
    assert choice.retried.tolist() == [False, True, True]
    without = select_brts(rewards, alignment)
    assert without.index.tolist() == [0, 1, 1] and without.retried.tolist() == [False, False, False]


def test_alignment_mask_and_pairing_by_hand():
    student = torch.tensor([[[1, 2], [3, 4]]])
    teacher = torch.tensor([[[2, 5], [4, 3]]])
    assert trajectory_alignment(student, teacher, torch.tensor([[1, 1]])).tolist() == [0.75]  # (1/2 + 2/2) / 2
    assert trajectory_alignment(student, teacher, torch.tensor([[1, 0]])).tolist() == [0.5]
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    assert completion_mask(ids, [1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # up to and including the first EOS
    assert pair_index(torch.arange(6), 4).tolist() == [0, 1, 2, 3, 0, 1]  # student j <-> teacher sample j mod N
    logps, top = teacher_topk(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    assert top.tolist() == [[1, 2]]
    assert torch.allclose(logps, torch.tensor([[2.0, 1.0]]) - torch.tensor([0.0, 2.0, 1.0]).logsumexp(0))


def test_retry_candidates_are_spread_to_their_prompts_and_joined_after_the_first_ones():
    def candidates(p: int, n: int, length: int, value: float) -> Candidates:
        ids = torch.full((p, n, length), int(value), dtype=torch.long)
        topk = (torch.full((p, n, length, 2), value), torch.full((p, n, length, 2), int(value), dtype=torch.long))
        return Candidates(ids, torch.ones_like(ids), torch.full((p, n), value), torch.full((p, n), value), topk)

    retry = candidates(1, 2, 3, 7.0).spread(torch.tensor([1]), 3)  # prompt 1 of 3 was retried
    assert retry.rewards.isnan().tolist() == [[True, True], [False, False], [True, True]]
    assert retry.alignment[0].tolist() == [-math.inf, -math.inf] and retry.mask[0].sum() == 0
    pool = candidates(3, 2, 2, 1.0).join(retry)
    assert pool.ids.shape == (3, 4, 3) and pool.topk[0].shape == (3, 4, 3, 2)
    assert pool.ids[1].tolist() == [[1, 1, 0], [1, 1, 0], [7, 7, 7], [7, 7, 7]]  # the first N right-padded
    assert pool.mask[1].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]


# ----------------------------------------------------------------------------------- BRTS's loss, by hand
def test_topk_trajectory_kl_and_its_gradient_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, 0]])
    teacher = torch.tensor([[math.log(0.5), math.log(0.25)]])  # renormalized over the two: q = (2/3, 1/3)
    loss = topk_trajectory_kl(logits, teacher, ids)
    e = math.e
    s2, s0 = 1 / (1 + e), e / (1 + e)  # the student renormalized over tokens 2 and 0: softmax(1, 2)
    expected = 2 / 3 * math.log((2 / 3) / s2) + 1 / 3 * math.log((1 / 3) / s0)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    # dL/dz = s - q on the teacher's top K, nothing elsewhere
    assert torch.allclose(logits.grad, torch.tensor([[s0 - 1 / 3, 0.0, s2 - 2 / 3, 0.0]], dtype=torch.float64))


def test_chunked_topk_kl_and_sampled_logps_equal_the_direct_formula_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=False).double()
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(7, 11, dtype=torch.float64)
    logps, ids = teacher_topk(teacher_logits, 3)
    chunked = chunked_topk_kl(hidden, head, logps, ids, chunk_tokens=3)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    direct = []
    for t in range(7):  # the formula token by token, in float64
        q = torch.softmax(logps[t], 0)
        s = torch.softmax(head(hidden[t])[ids[t]], 0)
        direct.append((q * (q.log() - s.log())).sum())
    direct = torch.stack(direct)
    (grad_direct,) = torch.autograd.grad(direct.sum(), hidden)
    # the loss runs in float32 (as on a bf16 model's float32 logits)
    assert torch.allclose(chunked.double(), direct, atol=1e-6)
    assert torch.allclose(grad_chunked, grad_direct, atol=1e-6)
    tokens = torch.randint(0, 11, (7,))
    sampled = chunked_sampled_logps(hidden, head, tokens, chunk_tokens=4)
    assert torch.allclose(sampled.double(), torch.log_softmax(head(hidden), -1)[torch.arange(7), tokens], atol=1e-6)


# ----------------------------------------------------------------------------------- PBSD's loss, by hand
def test_pbsd_loss_and_its_gradient_by_hand():
    policy_pos = torch.tensor([-3.0], requires_grad=True)
    policy_neg = torch.tensor([-4.0], requires_grad=True)
    ref_pos, ref_neg = torch.tensor([-5.0]), torch.tensor([-2.0])
    loss, margin = pbsd_loss(policy_pos, ref_pos, policy_neg, ref_neg, beta=0.1)
    # m = 0.1 * ((-3 + 5) - (-4 + 2)) = 0.4; L = -log sigmoid(0.4) = log(1 + e^-0.4)
    assert margin.item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.4)), abs=1e-6)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(0.4))  # sigmoid(-m)
    assert policy_pos.grad.item() == pytest.approx(-0.1 * sig, abs=1e-7)
    assert policy_neg.grad.item() == pytest.approx(0.1 * sig, abs=1e-7)


# ------------------------------------------------------------------------------------------------------- config
def test_teacher_rollout_config_defaults_and_refusals(tmp_path):
    off = make_config(tmp_path)
    assert off.teacher_rollout_loss == "none" and off.teacher_rollout_coef is None  # not a changed knob when off
    assert make_config(tmp_path, teacher_rollout_loss="brts").teacher_rollout_coef == 0.05
    assert make_config(tmp_path, teacher_rollout_loss="pbsd").teacher_rollout_coef == 1.0
    assert make_config(tmp_path, teacher_rollout_loss="pbsd", teacher_rollout_coef=0.3).teacher_rollout_coef == 0.3
    mad_opd = {"teacher_model": "t", "mad_opd_teachers": ["u"], "distill_loss": "jsd", "credit": "grpo"}
    refusals = [
        ({"teacher_rollout_loss": "dpo"}, "--teacher_rollout_loss.*'dpo'"),
        ({"teacher_rollout_loss": "brts", "teacher_rollouts": 0}, "--teacher_rollouts.*>= 1"),
        ({"teacher_rollout_loss": "pbsd", "pbsd_beta": 0.0}, "--pbsd_beta.*> 0"),
        ({"teacher_rollout_loss": "brts", "teacher_rollout_coef": -1.0}, "--teacher_rollout_coef.*>= 0"),
        ({"teacher_rollout_loss": "brts", "use_vllm": True}, "use_vllm set.*holds only the policy's weights"),
        ({"teacher_rollout_loss": "pbsd", "stages": [{"until_step": 2}]}, "with stages set"),
        ({**mad_opd, "teacher_rollout_loss": "pbsd"}, "with mad_opd_teachers set"),
        ({"teacher_rollout_loss": "brts", "privileged_source": "sibling"}, "privileged_source='sibling'"),
        ({"teacher_rollout_loss": "pbsd", "privileged_source": "both"}, "privileged_source='both'"),
        ({"teacher_rollout_loss": "brts", "distill_overlap_k": 0}, "--distill_overlap_k.*BRTS"),
    ]
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=message):
            make_config(tmp_path, **overrides)


def test_teacher_rollouts_refuse_tools_and_need_the_answers_for_brts(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="pbsd")
    check = functools.partial(TeacherRolloutTerm.check_supported, trainer.args, trainer.model, {}, images=False,
                              fsdp=False, deepspeed=False)  # fmt: skip
    check(tools=False)  # a plain run passes
    with pytest.raises(NotImplementedError, match="teacher_rollout_loss='pbsd' with tools"):
        check(tools=True)  # what the trainer passes when TRL holds tools
    no_answers = make_dataset().remove_columns("solution")
    with pytest.raises(ValueError, match="no privileged column 'solution'"):
        build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="brts", privileged_source="none",
                      teacher_model=None, dataset=no_answers)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- training
TEACHERS = [{"teacher": "synced"}, {"teacher": "live"}, {"external": True}]


def rollout_trainer(tokenizer, tmp_path, teacher_dir, teacher: dict, **overrides):
    config = dict(credit="grpo", teacher_rollouts=2, **overrides)
    if teacher.get("external"):
        config.update(teacher_model=str(teacher_dir), privileged_source="none")
    else:
        config.update(teacher)
    return build_trainer(tokenizer, tmp_path, **config)


@pytest.mark.parametrize("teacher", TEACHERS, ids=["synced", "live", "external"])
@pytest.mark.parametrize("method", ["brts", "pbsd"])
def test_a_training_step_with_teacher_rollouts_logs_its_metrics(tokenizer, tmp_path, teacher_dir, teacher, method):
    trainer = rollout_trainer(tokenizer, tmp_path, teacher_dir, teacher, teacher_rollout_loss=method)
    before = params(trainer.model)
    trainer.train()
    keys = logged_keys(trainer)
    assert {"rlsd/teacher_rollout_loss", "rlsd/teacher_rollout_time_s"} <= keys
    if method == "brts":
        assert {"rlsd/teacher_rollout_correct", "rlsd/teacher_rollout_retry", "rlsd/teacher_rollout_alignment"} <= keys
        assert 0.0 <= logged(trainer, "rlsd/teacher_rollout_correct") <= 1.0
        assert logged(trainer, "rlsd/teacher_rollout_loss") >= 0.0
    else:
        assert "rlsd/pbsd_margin" in keys
        assert logged(trainer, "rlsd/teacher_rollout_loss") > 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("method", ["brts", "pbsd"])
def test_coefficient_zero_is_plain_grpo_and_a_positive_one_changes_the_step(tokenizer, tmp_path, method):
    results = {}
    for name, config in {
        "grpo": {},
        "zero": {"teacher_rollout_loss": method, "teacher_rollout_coef": 0.0},
        "on": {"teacher_rollout_loss": method, "teacher_rollout_coef": 1.0},
    }.items():
        # plain SGD: the update is lr * gradient (Adam would blow float rounding of near-zero gradients up to lr)
        trainer = build_trainer(tokenizer, tmp_path / name, credit="grpo", teacher_rollouts=2, optim="sgd", **config)
        trainer.train()
        results[name] = (logged(trainer, "loss"), params(trainer.model))
    assert results["zero"][0] == pytest.approx(results["grpo"][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results["zero"][1], results["grpo"][1], strict=True))
    assert results["on"][0] != pytest.approx(results["grpo"][0], abs=1e-4)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results["on"][1], results["grpo"][1], strict=True))


def rollout_batch(trainer):
    """The rollout batch of the trainer's first training prompts (TRL's rollout, then the teacher rollouts)."""
    trainer.model.train()
    inputs = [make_dataset()[i // 4] for i in range(4)]  # one group of G = 4 rows of the first prompt
    return inputs, trainer._generate_and_score_completions(inputs)


def test_a_live_self_teacher_shown_the_plain_prompt_has_nothing_to_teach(tokenizer, tmp_path):
    # teacher == student (same weights, same prompt): p_T^K = p_S^K (KL 0, overlap 1) and PBSD's margin is 0; every
    # teacher trajectory is correct, so BRTS never retries with the answer shown
    def correct(completions, **kwargs):
        return [1.0] * len(completions)

    brts = build_trainer(tokenizer, tmp_path / "b", reward=correct, credit="grpo", teacher="live",
                         privileged_source="none", teacher_rollout_loss="brts", teacher_rollouts=2,
                         distill_overlap_k=4)  # fmt: skip
    brts.train()
    assert logged(brts, "rlsd/teacher_rollout_retry") == 0.0
    assert logged(brts, "rlsd/teacher_rollout_loss") == pytest.approx(0.0, abs=1e-5)
    assert logged(brts, "rlsd/teacher_rollout_alignment") == pytest.approx(1.0)
    pbsd = build_trainer(tokenizer, tmp_path / "p", credit="grpo", teacher="live", privileged_source="none",
                         teacher_rollout_loss="pbsd", teacher_rollouts=2)  # fmt: skip
    pbsd.train()
    assert logged(pbsd, "rlsd/pbsd_margin") == pytest.approx(0.0, abs=1e-4)
    assert logged(pbsd, "rlsd/teacher_rollout_loss") == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize(
    ("reward", "source", "correct", "retry"),
    [(1.0, "none", 1.0, 0.0), (0.0, "none", 0.0, 1.0), (0.0, "answer", 0.0, 0.0)],
)
def test_brts_scores_the_teacher_trajectories_with_the_reward_functions(
    tokenizer, tmp_path, reward, source, correct, retry
):
    """The retry with the answer shown runs when no first trajectory is correct, unless the first ones already saw
    the answer (`privileged_source="answer"`: a retry would re-sample the identical prompt)."""
    calls = []

    def constant(completions, solution, **kwargs):
        calls.append((len(completions), list(solution)))
        return [reward] * len(completions)

    trainer = build_trainer(tokenizer, tmp_path, reward=constant, credit="grpo", teacher_rollout_loss="brts",
                            teacher_rollouts=3, privileged_source=source)  # fmt: skip
    trainer.train()
    # TRL's rollout (4 completions), then the teacher's 3 for the one prompt of the batch, then (when none is
    # correct) the 3 of the answer-shown retry, each with the prompt's own answer column
    assert [size for size, _ in calls] == ([4, 3, 3] if retry else [4, 3])
    answer = calls[0][1][0]
    assert calls[0][1] == [answer] * 4 and all(solutions == [answer] * 3 for _, solutions in calls[1:])
    assert logged(trainer, "rlsd/teacher_rollout_correct") == correct
    assert logged(trainer, "rlsd/teacher_rollout_retry") == retry


def test_a_reward_function_that_raises_on_a_teacher_trajectory_is_named(tokenizer, tmp_path):
    calls = []

    def fragile(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) > 1:  # the teacher's trajectories
            raise ZeroDivisionError("boom")
        return parity_reward(completions)

    trainer = build_trainer(tokenizer, tmp_path, reward=fragile, credit="grpo", teacher_rollout_loss="brts",
                            teacher_rollouts=2)  # fmt: skip
    with pytest.raises(RewardError, match=r"fragile.*ZeroDivisionError: boom"):
        trainer.train()


def test_brts_batch_carries_the_selected_trajectory_and_its_teacher_topk(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="brts", teacher_rollouts=2,
                            distill_overlap_k=5)  # fmt: skip
    _, batch = rollout_batch(trainer)
    ids, mask = batch["rlsd_term_ids"], batch["rlsd_term_mask"]
    logps, top = batch["rlsd_term_topk_logps"], batch["rlsd_term_topk_ids"]
    assert ids.shape == mask.shape and ids.size(0) == 4 and ids.size(1) <= 8
    assert logps.shape == top.shape == (*ids.shape, 5)
    assert all(torch.equal(ids[0], row) for row in ids)  # one prompt: its four rows share the kept trajectory
    assert mask[0].sum() > 0 and mask[1:].sum() == 0  # ... and only its first row carries it into the loss
    # the teacher top-K equals a direct forward of the teacher copy on [teacher prompt ; trajectory]
    length = int(mask[0].sum())
    prompt = trainer.teacher_inputs([make_dataset()[0]], {"prompt_ids": None}, "train")[0]
    sequence = torch.cat([prompt[0], ids[0, :length]]).unsqueeze(0)
    with torch.no_grad():
        logits = trainer.teacher.model(input_ids=sequence).logits[0, prompt.size(1) - 1 : -1] / trainer.temperature
    direct_logps, direct_ids = teacher_topk(logits, 5)
    assert torch.equal(direct_ids, top[0, :length])
    assert torch.allclose(direct_logps, logps[0, :length], atol=1e-5)


def rollout_terms_and_forward_rows(trainer, *batches):
    """The loss-time teacher-rollout term of each batch (TRL's own student log-probs taken as 0) and the rows of
    every student backbone forward it ran."""
    from rlsd.step.batch import RLSDEntries
    from rlsd.teachers import backbone_and_head

    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    backbone, _ = backbone_and_head(trainer.model)
    seen = []
    handle = backbone.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].size(0)),
                                            with_kwargs=True)  # fmt: skip
    try:
        terms = []
        for batch in batches:
            student = torch.zeros_like(batch["completion_mask"], dtype=torch.float)
            terms.append(trainer.rollout_term.term(trainer.model, batch, RLSDEntries.from_batch(batch), student))
    finally:
        handle.remove()
    return terms, seen


def test_brts_learns_each_kept_trajectory_once_with_the_same_term_as_on_every_row(tokenizer, tmp_path):
    """The loss-time student forward runs on the one row per prompt that carries the trajectory; the token mean
    equals the one over every row of the group carrying it (duplicates do not move a mean)."""
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="brts", teacher_rollouts=2)
    _, batch = rollout_batch(trainer)
    every = dict(batch, rlsd_term_mask=batch["rlsd_term_mask"][0].expand_as(batch["rlsd_term_mask"]))
    (once, on_every_row), seen = rollout_terms_and_forward_rows(trainer, batch, every)
    assert seen == [1, 4]
    assert float(once) > 0 and torch.allclose(once, on_every_row, atol=1e-6)


def test_distinct_rows_by_hand():
    rows = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    first, inverse = distinct_rows(rows)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(rows[first][inverse], rows)


def test_pbsd_scores_each_distinct_teacher_sample_once_with_the_same_loss(tokenizer, tmp_path):
    """G = 4 completions share N = 2 teacher samples: the student's forward runs on the 2 distinct [prompt ; sample]
    rows, and the term equals the DPO loss over the four pairs from per-row student log-probs."""
    from rlsd.core.rollout_losses import pbsd_loss

    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="pbsd", teacher_rollouts=2)
    _, batch = rollout_batch(trainer)
    (term,), seen = rollout_terms_and_forward_rows(trainer, batch)
    assert seen == [2]
    ids, mask = batch["rlsd_term_ids"], batch["rlsd_term_mask"]
    positive = []
    for row in range(ids.size(0)):  # each pair's log pi(y+ | x), one plain forward per row
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        sample = ids[row][mask[row].bool()]
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.cat([prompt, sample]).unsqueeze(0)).logits[0]
        logits = logits[prompt.size(0) - 1 : -1]
        positive.append(torch.log_softmax(logits / trainer.temperature, -1).gather(-1, sample[:, None]).sum())
    losses, _ = pbsd_loss(torch.stack(positive), batch["rlsd_term_ref_logps"], torch.zeros(ids.size(0)),
                          batch["rlsd_term_neg_ref_logps"], trainer.args.pbsd_beta)  # fmt: skip
    assert torch.allclose(term, trainer.args.teacher_rollout_coef * losses.mean(), atol=1e-5)


def test_pbsd_pairs_each_completion_with_a_teacher_sample_and_scores_both_under_the_teacher(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="pbsd", teacher_rollouts=2)
    _, batch = rollout_batch(trainer)
    ids, mask = batch["rlsd_term_ids"], batch["rlsd_term_mask"]
    assert torch.equal(ids[0], ids[2]) and torch.equal(ids[1], ids[3])  # student j <-> teacher sample j mod 2
    # log pi_T(y- | x_T) equals the teacher's scoring pass on the completions
    scores = trainer.teacher_scores([make_dataset()[0]] * 4, batch, "train").logps
    expected = (scores * batch["completion_mask"]).sum(-1)
    assert torch.allclose(batch["rlsd_term_neg_ref_logps"], expected, atol=1e-5)
    # log pi_T(y+ | x_T) equals a direct forward of the teacher on [teacher prompt ; its sample]
    prompt = trainer.teacher_inputs([make_dataset()[0]], {"prompt_ids": None}, "train")[0][0]
    length = int(mask[0].sum())
    sequence = torch.cat([prompt, ids[0, :length]]).unsqueeze(0)
    with torch.no_grad():
        logits = trainer.teacher.model(input_ids=sequence).logits[0, prompt.size(0) - 1 : -1] / trainer.temperature
    direct = torch.log_softmax(logits, -1).gather(-1, ids[0, :length].unsqueeze(-1)).sum()
    assert batch["rlsd_term_ref_logps"][0].item() == pytest.approx(direct.item(), abs=1e-4)


def test_teacher_generation_follows_the_run_generation_config(tokenizer, tmp_path):
    # top_k=1 makes sampling greedy: the teacher's rollouts equal its greedy continuation, max_completion_length long
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollout_loss="pbsd", teacher_rollouts=2,
                            top_k=1, max_completion_length=6)  # fmt: skip
    prompt = trainer.teacher_inputs([make_dataset()[0]], {"prompt_ids": None}, "train")[0]
    ids, mask = trainer.rollout_term.rollouts.generate(prompt, torch.ones_like(prompt), 2)
    greedy = trainer.teacher.model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )[0, prompt.size(1) :]  # fmt: skip
    assert ids.shape[1] <= 6 and torch.equal(ids[0], ids[1])
    length = int(mask[0].sum())
    assert torch.equal(ids[0, :length], greedy[:length])


def tiny_gemma2(tokenizer, softcap: float = 30.0):
    """A tiny Gemma-2 whose head soft-caps its logits (`final_logit_softcapping`), with logits large enough to be
    capped."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap, attn_logit_softcapping=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        query_pre_attn_scalar=16, sliding_window=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_brts_refuses_a_model_that_caps_its_logits(tokenizer, tmp_path):
    """BRTS's top-K KL projects hidden states through a plain head; Gemma-2's soft-capped logits would differ by up to
    0.45 nat per token."""
    with pytest.raises(ValueError, match=r"teacher_rollout_loss='brts'.*final_logit_softcapping=30"):
        build_trainer(tokenizer, tmp_path, model=tiny_gemma2(tokenizer), credit="grpo", teacher="live",
                      teacher_rollout_loss="brts", teacher_rollouts=2)  # fmt: skip


@pytest.mark.parametrize(("model_kind", "bf16"), [("gemma2-softcap", False), ("qwen2-fp32", True)])
def test_pbsd_margin_is_zero_when_the_teacher_is_the_student(tokenizer, tmp_path, model_kind, bf16):
    """Teacher == student: PBSD's margin (log pi(y+) - log pi_T(y+)) - (log pi(y-) - log pi_T(y-)) is 0 only when its
    four log-probs come from one scoring path: the model's own logit scaling (Gemma-2's softcap: 0.3 nat per
    sequence apart before) and the loss's autocast (bf16 with fp32 weights: 1.7e-3 before)."""
    from conftest import make_model

    model = tiny_gemma2(tokenizer) if model_kind == "gemma2-softcap" else make_model(tokenizer)
    trainer = build_trainer(tokenizer, tmp_path, model=model, credit="grpo", teacher="live", privileged_source="none",
                            teacher_rollout_loss="pbsd", teacher_rollouts=2, bf16=bf16)  # fmt: skip
    _, batch = rollout_batch(trainer)
    trainer.current_gradient_accumulation_steps = 1
    trainer._compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["rlsd/pbsd_margin"][-1] == pytest.approx(0.0, abs=1e-5)
