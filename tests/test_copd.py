"""CoPD (`rlsd.copd`, `rlsd.core.co_evolving`): the schedule counted, the merge and the mutual-distillation loss
pinned by hand, a run's segments and teachers, its resume after a kill equal to a straight run, and bad input."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from conftest import config_kwargs, make_dataset, make_model, parity_reward
from transformers import TrainerCallback

from rlsd import RLSDConfig
from rlsd.copd import COPD_STATE_FILE, CoPDConfig, CoPDTrainer
from rlsd.core.co_evolving import DISTILL, RL, Segment, average_states, copd_schedule
from rlsd.core.distill import token_loss_fn


# ------------------------------------------------------------------------------------------------------ schedule
def test_two_branch_schedule_alternates_own_grpo_and_distillation_from_the_other_branch():
    segments = copd_schedule(2, 5, rl_steps=2, distill_steps=1)
    assert segments == [
        Segment(0, RL, 0, 0, 0, 2), Segment(0, RL, 1, 1, 0, 2),
        Segment(0, DISTILL, 0, 1, 2, 1), Segment(0, DISTILL, 1, 0, 2, 1),
        Segment(1, RL, 0, 0, 3, 2), Segment(1, RL, 1, 1, 3, 2),  # the last round is cut at max_steps: no distillation
    ]  # fmt: skip
    assert [s.teacher for s in segments] == [None, None, 1, 0, None, None]


def test_three_branch_schedule_counts_every_branch_domain_and_teacher():
    segments = copd_schedule(3, 7, rl_steps=2, distill_steps=3)
    steps = Counter()
    for s in segments:
        steps[(s.branch, s.phase, s.domain)] += s.steps
    # each round: 2 own steps, then 3 distillation steps split 2 + 1 over the next branch and the one after
    assert steps == {(0, RL, 0): 4, (1, RL, 1): 4, (2, RL, 2): 4,
                     (0, DISTILL, 1): 2, (0, DISTILL, 2): 1, (1, DISTILL, 2): 2, (1, DISTILL, 0): 1,
                     (2, DISTILL, 0): 2, (2, DISTILL, 1): 1}  # fmt: skip
    for branch in range(3):
        mine = [s for s in segments if s.branch == branch]
        assert sum(s.steps for s in mine) == 7
        assert all(a.end == b.start for a, b in itertools.pairwise(mine))  # contiguous, in order
    assert all(s.teacher != s.branch for s in segments if s.phase == DISTILL)


def test_schedule_refuses_one_branch_and_empty_phases():
    with pytest.raises(ValueError, match="number of branches"):
        copd_schedule(1, 4, 1, 1)
    with pytest.raises(ValueError, match="copd_rl_steps >= 1"):
        copd_schedule(2, 4, 0, 1)


# --------------------------------------------------------------------------------------------------------- merge
def test_merge_is_the_uniform_parameter_average_and_keeps_dtypes():
    states = [
        {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "n": torch.tensor([3])},
        {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.bfloat16), "n": torch.tensor([3])},
        {"w": torch.tensor([2.0, 7.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16), "n": torch.tensor([3])},
    ]
    merged = average_states(states)
    assert torch.equal(merged["w"], torch.tensor([2.0, 5.0]))
    assert merged["h"].dtype == torch.bfloat16 and merged["h"].item() == 2.0
    assert torch.equal(merged["n"], torch.tensor([3]))


def test_merge_refuses_mismatched_architectures_naming_the_branch_and_parameter():
    base = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"branch 1 .*different architectures .*missing \['b'\]"):
        average_states([base, {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"branch 2 .*parameter 'w' is \(3,\)"):
        average_states([base, base, {"w": torch.zeros(3), "b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="non-float entry 'n' differs"):
        average_states([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])


# ------------------------------------------------------------------------------------------------- the loss
def domains(n: int = 4) -> dict:
    """Two domains of the conftest prompts: the first `n` rows and the next `n`."""
    rows = make_dataset(2 * n)
    return {"first": rows.select(range(n)), "second": rows.select(range(n, 2 * n))}


def copd_trainer(tokenizer, tmp_path, callbacks=None, max_steps=3, **copd):
    # rewards in-process (reward_timeout=0): no worker round trips in a test of a dozen short trainer runs
    args = RLSDConfig(**config_kwargs(tmp_path, credit="grpo", max_steps=max_steps, learning_rate=5e-2,
                                      reward_timeout=0))  # fmt: skip
    config = CoPDConfig(**{"copd_rl_steps": 1, "copd_distill_steps": 1, **copd})
    return CoPDTrainer(make_model(tokenizer), parity_reward, args, domains(), tokenizer, copd=config,
                       callbacks=callbacks)  # fmt: skip


def test_the_mutual_distillation_loss_is_the_reverse_kl_on_a_hand_computed_case(tokenizer, tmp_path):
    run = copd_trainer(tokenizer, tmp_path)
    segment = next(s for s in run.schedule if s.phase == DISTILL and s.branch == 0)
    args = run.segment_args(segment)
    assert (args.teacher, args.teacher_model) == ("external", run.teacher_dir(0, 1))  # taught by branch 1
    assert (args.credit, args.policy_loss_coef, args.privileged_source, args.teacher_template) == (
        "grpo", 0.0, "none", "{prompt}")  # fmt: skip
    loss = token_loss_fn(args.distill_loss, args)  # what the segment's RLSDTrainer builds from its config
    # student p = (1/2, 1/2), teacher q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3);
    # student p = (3/4, 1/4), teacher q = (1/2, 1/2): KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2)
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    expected = torch.tensor([0.5 * math.log(4 / 3), 0.75 * math.log(1.5) + 0.25 * math.log(0.5)])
    assert torch.allclose(loss(student, teacher), expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- runs
class Recorder(TrainerCallback):
    """Every forwarded log's (branch, distill, step), each phase end's step, and (at `kill`) an interruption; in a
    distillation segment, its distillation loss and the teacher's weights against the teaching branch's checkpoint."""

    def __init__(self, run_ref: list, kill: tuple | None = None) -> None:
        self.run_ref, self.kill = run_ref, kill
        self.logs, self.phase_ends, self.teachers_match, self.distill_losses = [], [], [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:
            return
        key = (logs["copd/branch"], int(logs["copd/distill"]), state.global_step)
        self.logs.append(key)
        run = self.run_ref[0]
        if run.segment.phase == DISTILL:
            self.distill_losses.append(logs["rlsd/distill_loss"])
            teacher = run._last.teacher.model
            folder = f"{run.branch_dir(run.segment.teacher)}/checkpoint-{run.segment.start}"
            expected = type(run.base).from_pretrained(folder)
            self.teachers_match.append(all(torch.equal(a, b) for a, b in zip(
                teacher.state_dict().values(), expected.state_dict().values(), strict=True)))  # fmt: skip
        if key == self.kill:
            raise KeyboardInterrupt("killed")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.phase_ends.append(state.global_step)


def test_a_run_follows_the_schedule_and_its_resume_after_a_kill_equals_a_straight_run(tokenizer, tmp_path):
    ref: list = []
    straight_log = Recorder(ref)
    straight = copd_trainer(tokenizer, tmp_path / "a", callbacks=[straight_log])
    ref.append(straight)
    merged = straight.train()
    # branch 0 then 1 on their own domain (step 1), each taught by the other (step 2), own domain again (step 3)
    assert straight_log.logs == [(0, 0, 1), (1, 0, 1), (0, 1, 2), (1, 1, 2), (0, 0, 3), (1, 0, 3)]
    assert straight_log.phase_ends == [1, 2, 3]
    assert straight_log.teachers_match == [True, True]  # each distillation step's teacher: the other branch
    assert min(straight_log.distill_losses) > 1e-6  # the branches differ after their own step: the KL is live
    branches = [straight.branch_states()[k] for k in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(branches[0].values(), branches[1].values(), strict=True))
    average = average_states(branches)
    assert all(torch.equal(merged.state_dict()[k], average[k]) for k in average)

    ref.clear()
    killer = Recorder(ref, kill=(1, 1, 2))  # killed inside branch 1's distillation step, before its checkpoint
    first = copd_trainer(tokenizer, tmp_path / "b", callbacks=[killer])
    ref.append(first)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (first.latest_step(0), first.latest_step(1)) == (2, 1)
    ref[0] = copd_trainer(tokenizer, tmp_path / "b", callbacks=[Recorder(ref)])
    resumed = ref[0].train(resume_from_checkpoint=True)
    pairs = zip(resumed.state_dict().values(), merged.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for k in range(2):
        again = ref[0].branch_states()[k]
        assert all(torch.equal(again[name], branches[k][name]) for name in again)


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_it(tokenizer, tmp_path):
    args = RLSDConfig(**config_kwargs(tmp_path, credit="grpo", max_steps=2))
    with pytest.raises(ValueError, match=r"at least 2 domains .*\['only'\]"):
        CoPDTrainer(make_model(tokenizer), parity_reward, args, {"only": make_dataset()}, tokenizer)
    empty = {"first": make_dataset(), "second": make_dataset().select([])}
    with pytest.raises(ValueError, match="domain 'second' has an empty dataset"):
        CoPDTrainer(make_model(tokenizer), parity_reward, args, empty, tokenizer)
    rlsd = RLSDConfig(**config_kwargs(tmp_path, credit="rlsd", teacher="synced", max_steps=2))
    with pytest.raises(ValueError, match="credit='rlsd' with teacher='synced'"):
        CoPDTrainer(make_model(tokenizer), parity_reward, rlsd, domains(), tokenizer)
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        CoPDConfig(copd_distill_loss="kl")
    run = CoPDTrainer(make_model(tokenizer), parity_reward, args, domains(), tokenizer)
    with pytest.raises(FileNotFoundError, match=COPD_STATE_FILE):
        run.train(resume_from_checkpoint=True)
    (tmp_path / COPD_STATE_FILE).write_text('{"domains": ["first", "second"], "schedule": []}')
    with pytest.raises(ValueError, match="other domains or another schedule"):
        run.train(resume_from_checkpoint=True)


def test_copd_is_a_bench_method_on_the_task_operator_domains():
    from rlsd.experiments.copd_task import operator_domains
    from rlsd.experiments.methods import CATALOGUE
    from rlsd.experiments.orchestrated import ORCHESTRATED
    from rlsd.experiments.task import TaskConfig, make_rl_dataset

    assert "copd" in CATALOGUE and "copd" in ORCHESTRATED
    rows = make_rl_dataset(TaskConfig(num_operands=3), 64, seed=0)
    split = operator_domains(rows)
    assert all("*" in p for p in split["products"]["prompt"]) and not any("*" in p for p in split["sums"]["prompt"])
    assert len(split["products"]) + len(split["sums"]) == 64 and min(map(len, split.values())) > 0
