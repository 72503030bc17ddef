"""NPO / AutoNPO (arXiv 2604.20733): the slot replacement on hand-made batches, AutoNPO's trigger and choice of
checkpoint on hand-made histories, the train-ahead / roll-back state machine, a trainer run and its resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, parity_reward

from rlsd.experiments.methods import CATALOGUE
from rlsd.infra.checkpoint import MANIFEST_FILE
from rlsd.step.near_future import (
    NearFutureSlots,
    choose_lookahead,
    group_advantages,
    hard_groups,
    replacement_rows,
    splice,
)
from rlsd.teachers import TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE
from rlsd.teachers.near_future import NearFutureTeacher, npo_should_trigger

# four groups of four: all wrong, one right, all wrong, all wrong
REWARDS = torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def test_hard_groups_are_those_where_every_completion_fails_or_at_most_the_accuracy_gate():
    assert hard_groups(REWARDS, 4, success=1.0, max_accuracy=0.0).tolist() == [True, False, True, True]
    assert hard_groups(REWARDS, 4, success=1.0, max_accuracy=0.25).tolist() == [True, True, True, True]


def test_exactly_one_slot_of_each_hard_group_with_a_verified_guide_rollout_is_replaced():
    hard = torch.tensor([True, False, True, True])
    verified = torch.tensor([[True], [True], [False], [True]])  # group 1 is not hard, group 2's guide failed
    rows, picks = replacement_rows(hard, verified, group_size=4)
    assert rows.tolist() == [3, 15] and picks.tolist() == [0, 3]  # the last slot of groups 0 and 3
    two = torch.tensor([[True, True], [True, True], [False, False], [False, True]])
    rows, picks = replacement_rows(hard, two, group_size=4)  # two guide samples per group, one slot
    assert rows.tolist() == [3, 15] and picks.tolist() == [0, 7]  # the first verified sample of each hard group
    rows, picks = replacement_rows(hard, two, group_size=4, slots=2)
    assert rows.tolist() == [3, 2, 15] and picks.tolist() == [0, 1, 7]  # npo_slots=2: one slot per verified one


def test_splice_replaces_only_the_chosen_rows_and_widens_with_padding():
    ids, mask = torch.arange(8).view(4, 2), torch.ones(4, 2, dtype=torch.long)
    new_ids, new_mask = torch.tensor([[7, 8, 9]]), torch.tensor([[1, 1, 0]])
    out_ids, out_mask = splice(ids, mask, torch.tensor([2]), new_ids, new_mask, pad_id=0)
    assert out_ids.tolist() == [[0, 1, 0], [2, 3, 0], [7, 8, 9], [6, 7, 0]]
    assert out_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]


def test_group_advantages_are_trl_grpo_advantages():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0])  # mean 0.25, unbiased std 0.5
    expected = torch.tensor([-0.25, -0.25, -0.25, 0.75]) / 0.5001
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), expected)
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def _run(**args):
    """A stand-in `RunView` for `NearFutureSlots` on a hand-made batch: group 4, the guide's rollouts rewarded by
    their first token (7: correct)."""
    values = dict(npo_success_reward=1.0, npo_max_group_accuracy=0.0, npo_slots=1, npo_guide_samples=1,
                  npo_trigger="step", scale_rewards="group")  # fmt: skip
    values.update(args)
    tokenizer = SimpleNamespace(pad_token_id=0, batch_decode=lambda rows, **_: [str(r[0]) for r in rows])
    rewards = lambda inputs, prompts, completions, ids: torch.tensor([[1.0 if c == "7" else 0.0] for c in completions])  # noqa: E731
    logged = []
    run = SimpleNamespace(args=SimpleNamespace(**values), group_sizes=(4, 4), tokenizer=tokenizer, eos_token_ids=[1],
                          generation_config=None, trl_rewards=rewards, reward_weights=torch.ones(1),
                          log=lambda mode, metrics: logged.append(metrics))  # fmt: skip
    return run, logged


class _Guide(torch.nn.Module):
    """A guide whose completion of the i-th prompt it is asked is `answers[i]` (then EOS = 1)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate(self, input_ids, attention_mask, generation_config):
        self.asked = input_ids.size(0)
        tail = torch.tensor([[a, 1] for a in self.answers[: input_ids.size(0)]])
        return torch.cat([input_ids, tail], dim=1)


def test_intervene_replaces_one_slot_of_each_hard_group_and_recomputes_the_advantages():
    run, logged = _run()
    guide = SimpleNamespace(phase="guide", lookahead=2, model=_Guide([7, 5, 7]), mistakes=[])
    output = {"prompt_ids": torch.full((16, 3), 4), "prompt_mask": torch.ones(16, 3, dtype=torch.long),
              "completion_ids": torch.full((16, 2), 3), "completion_mask": torch.ones(16, 2, dtype=torch.long),
              "advantages": torch.zeros(16), "num_items_in_batch": torch.tensor(32.0)}  # fmt: skip
    tap = SimpleNamespace(rewards=REWARDS.clone(), prompts=[f"p{i // 4}" for i in range(16)])
    inputs = [{"prompt": f"p{i // 4}"} for i in range(16)]
    assert NearFutureSlots(run, guide).intervene(inputs, output, tap) == 2  # groups 0 and 3 (group 2's guide: 5)
    assert guide.model.asked == 3  # one rollout for each hard group (0, 2, 3), none for group 1
    changed = (output["completion_ids"] != 3).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 15]
    assert output["completion_ids"][3].tolist() == [7, 1]
    assert tap.rewards.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    expected = group_advantages(tap.rewards, 4, "group")
    torch.testing.assert_close(output["advantages"], expected)
    assert output["advantages"][8:12].abs().sum() == 0  # group 2 stays hard and unreplaced: no signal
    assert logged[-1]["npo/replaced"] == 2.0 and logged[-1]["npo/hard_groups"] == 3.0


def test_autonpo_trigger_on_hand_made_histories():
    kw = dict(window=2, min_gain=0.01, entropy_ratio=0.5)
    assert npo_should_trigger([0.1, 0.2, 0.3], [], **kw) is None  # fewer than two windows
    assert npo_should_trigger([0.1, 0.2, 0.3, 0.31], [], **kw) is None  # still improving: 0.305 - 0.15
    assert npo_should_trigger([0.3, 0.3, 0.3, 0.305], [], **kw) == "stagnation"  # gain 0.0025 < 0.01
    assert npo_should_trigger([0.1, 0.2, 0.3, 0.4], [2.0, 2.0, 0.9, 0.8], **kw) == "entropy"  # 0.85 < 0.5 * 2.0
    assert npo_should_trigger([0.1, 0.2, 0.3, 0.4], [2.0, 2.0, 1.2, 1.0], **kw) is None  # 1.1 >= 1.0


def test_autonpo_picks_the_checkpoint_with_the_largest_signal_over_variance():
    assert choose_lookahead({1: (0.5, 1.0), 2: (0.8, 2.0), 3: (0.6, 1.1)}) == 3  # S = 0.5, 0.4, 0.545
    assert choose_lookahead({1: (0.5, 1.0), 2: (1.0, 2.0)}) == 1  # a tie goes to the nearer checkpoint
    assert choose_lookahead({1: (0.0, 1.0), 2: (0.0, 1.0)}) == 2  # nothing solved: the farthest


def test_train_ahead_then_roll_back_policy_and_optimizer_to_the_anchor():
    policy = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.1)
    args = SimpleNamespace(npo_trigger="step", npo_start_step=1, npo_lookahead=2, npo_guide_steps=1)
    guide = NearFutureTeacher(policy, args)
    guide.bind_optimizer(optimizer)
    weights = []

    def step(n):
        optimizer.zero_grad()
        policy(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        weights.append(policy.weight.detach().clone())
        return guide.on_optimizer_step(n, policy)

    assert not step(1) and guide.phase == "ahead" and guide.anchor_step == 1
    anchor_moment = optimizer.state[policy.weight]["exp_avg"].clone()
    assert not step(2) and guide.phase == "ahead"
    assert step(3) and guide.phase == "guide" and guide.lookahead == 2
    assert torch.equal(guide.model.weight, weights[2])  # the guide: the weights two steps past the anchor
    assert torch.equal(policy.weight, weights[0])  # the policy: back at the anchor
    assert torch.equal(optimizer.state[policy.weight]["exp_avg"], anchor_moment)
    assert optimizer.state[policy.weight]["step"] == 1
    step(4)
    assert guide.phase == "done"  # 'step' intervenes once


NPO = {"credit": "grpo", "teacher": "near_future", "npo_trigger": "step", "npo_start_step": 1, "npo_lookahead": 1,
       "npo_guide_steps": 2, "npo_max_group_accuracy": 1.0, "npo_success_reward": 0.5, "max_steps": 3}  # fmt: skip
"""Every group hard (the accuracy gate at 1), every guide rollout verified (`half_or_one`): anchor after step 1,
guide from step 2's weights, guided step 3."""


def test_npo_is_in_the_catalogue():
    assert CATALOGUE["npo"]["teacher"] == "near_future" and CATALOGUE["npo"]["npo_trigger"] == "step"
    assert CATALOGUE["autonpo"]["npo_trigger"] == "auto"


def half_or_one(completions, **kwargs):
    """0.5 or 1 (the parity reward lifted): with `npo_success_reward=0.5` every guide rollout is verified and, with
    the accuracy gate at 1, every group is hard, so the guide fills exactly one slot per group; the spread inside
    groups keeps the policy moving."""
    return [0.5 + 0.5 * r for r in parity_reward(completions)]


def test_a_run_guides_step_three_and_its_resume_restores_the_anchor_and_the_guide_exactly(tokenizer, tmp_path):
    saved = {**NPO, "save_strategy": "steps", "save_steps": 1}
    straight = build_trainer(tokenizer, tmp_path / "a", reward=half_or_one, **saved)
    straight.train()
    logs = [entry for entry in straight.state.log_history if "rlsd/npo/replaced" in entry]
    assert [entry["rlsd/npo/guiding"] for entry in logs] == [0.0, 0.0, 1.0]
    assert [entry["rlsd/npo/replaced"] for entry in logs] == [0.0, 0.0, 1.0]  # one group of 4: one slot
    assert logs[2]["rlsd/npo/lookahead"] == 1.0
    assert straight.teacher.phase == "guide" and straight.teacher.steps_left == 1
    assert straight.teacher.optimizer is straight.optimizer  # handed by the sync callback: the rollback reaches it
    checkpoint = tmp_path / "a" / "checkpoint-1"  # saved inside the lookahead: the anchor is in it
    assert {TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE} <= set(
        json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    )
    assert json.loads((checkpoint / TEACHER_STATE_FILE).read_text())["phase"] == "ahead"
    resumed = build_trainer(tokenizer, tmp_path / "b", reward=half_or_one, **saved)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.teacher.state() == straight.teacher.state()
    pairs = zip(resumed.model.parameters(), straight.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    guides = zip(resumed.teacher.model.parameters(), straight.teacher.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in guides)


def test_npo_without_its_guide_or_with_too_many_slots_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="teacher='near_future'"):
        build_trainer(tokenizer, tmp_path, credit="grpo", npo_trigger="step")
    with pytest.raises(ValueError, match="npo_slots=4 must be below num_generations=4"):
        build_trainer(tokenizer, tmp_path, **{**NPO, "npo_slots": 4})


def test_autonpo_anchors_on_stagnation_and_adopts_the_candidate_with_the_largest_q_over_v(tokenizer, tmp_path):
    auto = {**NPO, "npo_trigger": "auto", "npo_window": 1, "npo_min_reward_gain": 1.0, "npo_lookahead": 2,
            "max_steps": 5}  # fmt: skip
    trainer = build_trainer(tokenizer, tmp_path, reward=half_or_one, **auto)
    trainer.train()
    guide = trainer.teacher
    assert guide.anchor_step == 2 and len(guide.entropies) == 2  # a gain below 1: stagnation after step 2
    assert sorted(guide.choice_stats) == [1, 2] and all(q == 1.0 and v > 0 for q, v in guide.choice_stats.values())
    assert guide.choice_stats[1][1] != guide.choice_stats[2][1]  # the policy moved: the candidates differ
    assert guide.lookahead == choose_lookahead(guide.choice_stats) and guide.phase == "guide"
    logs = [entry for entry in trainer.state.log_history if "rlsd/npo/replaced" in entry]
    assert [entry["rlsd/npo/replaced"] for entry in logs] == [0.0, 0.0, 0.0, 0.0, 1.0]
