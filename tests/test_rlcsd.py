"""RLCSD (arXiv 2606.11709): the `contrast` source's hints, the `rlcsd` rule on hand-computed values, and a rollout's
K + 1 teacher passes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_dataset

from rlsd.context.contrast import ContrastSource
from rlsd.context.sources import Context, RolloutView
from rlsd.core.contrast_rule import log_mean_exp
from rlsd.core.rules import RuleParams, Signals, get_rule
from rlsd.plan import Stages
from rlsd.step.scorer import Scorer

TEMPLATE = "[ref {hint}] {prompt}"


def rlcsd(signals: Signals, **knobs) -> torch.Tensor:
    return get_rule("rlcsd").fn(signals, RuleParams(**knobs))[0]


def test_the_rule_on_a_hand_computed_case():
    # row 0 (A = 1) has two negative passes, row 1 (A = -0.3) one (its second slot is invalid and must not count)
    negatives = torch.tensor([[[-1.0, -1.0, -0.5], [-2.0, -0.3, 0.0]], [[-3.0, -1.0, -0.5], [5.0, 5.0, 5.0]]])
    contrast = log_mean_exp(negatives, torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(contrast[0], torch.tensor([math.log((math.exp(-1) + math.exp(-3)) / 2), -1.0, -0.5]))
    torch.testing.assert_close(contrast[1, :2], torch.tensor([-2.0, -0.3]))
    signals = Signals(
        seq_advantages=torch.tensor([1.0, -0.3]),
        mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        teacher_logps=torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -0.4, 9.0]]),
        teacher_contrast_logps=contrast,
    )
    knobs = dict(lam=0.5, rlcsd_tau=0.5, rlcsd_beta=1.0, rlcsd_delta=0.1, rlcsd_eta=2.0, rlcsd_residual_clip_low=-0.2)
    # e_ctr = 0.56622 (r = 0.5 tanh(1.13244) = 0.40593), -1 (r = 0.5 tanh(-2) = -0.48201, clipped to -0.2), 0 (r = 0:
    # below delta, A_i); row 1: e_ctr = 1 (r = 0.48201; -0.3 + 0.48201 > 0 is clamped to 0: the sign never flips),
    # -0.1 (|r| = 0.09869 < delta: A_i), a padding token (0)
    expected = torch.tensor([[2 * (1 + 0.5 * 0.8118521294845358), 2 * (1 - 0.2), 1.0], [0.0, -0.3, 0.0]])
    torch.testing.assert_close(rlcsd(signals, **knobs), expected)


def test_the_rule_never_flips_the_sign_and_keeps_zero_advantages_at_zero():
    generator = torch.Generator().manual_seed(0)
    signals = Signals(
        seq_advantages=torch.tensor([1.5, 0.2, -0.1, 0.0, -2.0, 0.05]),
        mask=torch.ones(6, 5),
        teacher_logps=torch.randn(6, 5, generator=generator) * 3,
        teacher_contrast_logps=torch.randn(6, 5, generator=generator) * 3,
    )
    adv = rlcsd(signals, lam=1.0)  # the paper's knobs, lam = 1: |r_t| up to 1, enough to flip A_i = 0.2 or -0.1
    sign = signals.seq_advantages.sign().unsqueeze(1)
    assert ((adv * sign) >= 0).all() and (adv[3] == 0).all()
    assert (adv[1] == 0).any() and (adv[1] > 0.2).any() and (adv[2] == 0).any()  # clamped rows, and modulated ones
    # the same teacher on both sides: e_ctr = 0, r_t = 0, A_i everywhere; lam = 0 too
    same = Signals(signals.seq_advantages, signals.mask, signals.teacher_logps,
                   teacher_contrast_logps=signals.teacher_logps)  # fmt: skip
    grpo = signals.seq_advantages.unsqueeze(1).expand(6, 5)
    assert torch.equal(rlcsd(same, lam=0.5), grpo) and torch.equal(rlcsd(signals, lam=0.0), grpo)


def args(k: int) -> SimpleNamespace:
    return SimpleNamespace(contrast_negatives=k, sibling_reward_threshold=1.0, seed=0)


# three groups of 4: mixed [1, 0, 1, 0], all correct, and one correct completion among wrong ones
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
TEXTS = [f"c{i}" for i in range(12)]


def test_the_source_draws_hints_from_the_other_siblings_and_respects_k():
    view = RolloutView([{}] * 12, 4, 0, TEXTS, REWARDS)
    for _ in range(10):  # the draws are random: every draw must hold
        source = ContrastSource(args(4))
        context = source.context(view, range(12))
        assert context.has_context == [True] * 4 + [False] * 5 + [True] * 3  # no negative; row 8: no positive
        hints = context.fields["hint"]
        assert (hints[0], hints[2], hints[9], hints[11]) == ("c2", "c0", "c8", "c8")
        assert hints[1] in ("c0", "c2") and hints[3] in ("c0", "c2")
        metrics = context.metrics
        assert metrics["contrast_no_negative_count"] == 4.0 and metrics["contrast_no_positive_count"] == 1.0
        assert metrics["no_context_frac"] == 5 / 12 and metrics["contrast_negatives_mean"] == 12 / 7  # 2 1 2 1 2 2 2
        slots = source.negative_contexts(view, range(12))
        assert len(slots) == 4
        valid = [[slot.has_context[i] for slot in slots] for i in range(12)]
        negatives = [{slot.fields["hint"][i] for slot in slots if slot.has_context[i]} for i in range(12)]
        assert negatives[0] == negatives[2] == {"c1", "c3"} and valid[0] == [True, True, False, False]
        assert negatives[1] == {"c3"} and negatives[3] == {"c1"} and valid[1] == [True, False, False, False]
        assert negatives[9] == {"c10", "c11"} and negatives[8] == {"c9", "c10", "c11"} and negatives[4] == set()
        one = source.negative_contexts(view, range(12), k=1)
        assert len(one) == 1 and one[0].fields["hint"][1] == "c3" and one[0].fields["hint"][0] in ("c1", "c3")
        two = ContrastSource(args(2)).negative_contexts(view, range(12))  # row 8 has 3 wrong siblings: K = 2 of them
        assert len({slot.fields["hint"][8] for slot in two}) == 2 and all(slot.has_context[8] for slot in two)
    # this process's rows are the second group: its pools are read from the gathered rewards at its offset
    local = ContrastSource(args(2)).context(RolloutView([{}] * 4, 4, 4, TEXTS, REWARDS), range(4))
    assert local.has_context == [False] * 4


def build_rlcsd(tokenizer, tmp_path, **config):
    # two groups: rewards [1, 0, 1, 0] (rows 1 and 3 have one wrong sibling, fewer than K = 2) and [1, 0, 0, 0]
    # (row 4 has no right sibling: no context)
    rewards = lambda completions, **kw: [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0][: len(completions)]  # noqa: E731
    return build_trainer(
        tokenizer, tmp_path, reward=rewards, credit="rlcsd", privileged_source="contrast", teacher_template=TEMPLATE,
        rlsd_lambda_decay_steps=0, per_device_train_batch_size=8, **config,
    )  # fmt: skip


def test_a_rollout_runs_k_plus_one_teacher_passes_and_identical_contexts_give_grpo(tokenizer, tmp_path, monkeypatch):
    trainer = build_rlcsd(tokenizer, tmp_path, teacher="live", contrast_negatives=2)
    calls = []
    teacher_rows = Scorer.teacher_rows
    monkeypatch.setattr(Scorer, "teacher_rows", lambda self, *a, **kw: calls.append(1) or teacher_rows(self, *a, **kw))
    trainer.model.train()
    dataset = make_dataset()
    inputs = [dataset[0]] * 4 + [dataset[1]] * 4
    output = trainer._generate_and_score_completions(inputs)
    assert len(calls) == 3  # the correct hint, then K = 2 wrong ones
    assert output["rlsd_has_context"].tolist() == [True] * 4 + [False] + [True] * 3
    student = torch.zeros(output["completion_mask"].shape)
    mask = output["completion_mask"].bool()
    grpo = output["rlsd_seq_advantages"].unsqueeze(1) * mask
    adv = trainer.token_advantages(output, student)
    assert torch.equal(adv[4], grpo[4]) and not torch.equal(adv, grpo)  # A_i without context; modulated elsewhere

    # the wrong hints replaced by the right one (each row's slots as before): e_ctr = 0, so A_it = A_i
    recorded = []
    context, negatives = ContrastSource.context, ContrastSource.negative_contexts
    monkeypatch.setattr(ContrastSource, "context", lambda self, *a: recorded.append(context(self, *a)) or recorded[-1])
    monkeypatch.setattr(ContrastSource, "negative_contexts", lambda self, *a: [
        Context(dict(recorded[-1].fields), slot.has_context) for slot in negatives(self, *a)])  # fmt: skip
    output = trainer._generate_and_score_completions(inputs)
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(output["rlsd_teacher_contrast_logps"][mask], output["rlsd_teacher_logps"][mask])
    grpo = output["rlsd_seq_advantages"].unsqueeze(1) * mask
    assert (grpo != 0).any() and torch.equal(trainer.token_advantages(output, student), grpo)


def test_rlcsd_needs_the_contrast_source_and_takes_its_teacher_pass_at_rollout_time(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"credit='rlcsd' contrasts .* privileged_source='answer' does not give"):
        build_trainer(tokenizer, tmp_path, credit="rlcsd", privileged_source="answer")
    trainer = build_rlcsd(tokenizer, tmp_path, distill_loss="jsd")
    # with a distillation loss the rule still reads the rollout's K + 1 passes: the loss-time pass has no negatives
    assert not Stages(trainer.args, row_subsets=True).plan(None).teacher_at_loss
