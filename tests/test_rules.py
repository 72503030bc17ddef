"""Hand-computed values for every registered credit rule (specification section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd.core.rules import RULES, AntiSDGate, RuleParams, Signals, get_rule

F64 = torch.float64
DELTAS = [math.log(1.1), math.log(2.0), math.log(0.5), 0.0]


def signals(**overrides) -> Signals:
    """A = +1, -2, 0; the second completion's last token is masked; Delta per column as in DELTAS."""
    student = torch.full((3, 4), math.log(0.5), dtype=F64)
    values = dict(
        seq_advantages=torch.tensor([1.0, -2.0, 0.0], dtype=F64),
        mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
        teacher_logps=student + torch.tensor(DELTAS, dtype=F64),
        student_logps=student,
        teacher_entropy=torch.zeros(3, 4, dtype=F64),
        teacher_contrast_logps=student,  # RLCSD's teacher after wrong hints: the contrast is Delta
        group_ids=torch.tensor([0, 0, 0]),
        vocab_size=100,
    )
    values.update(overrides)
    return Signals(**values)


def test_rlrt_negates_delta_on_positive_completions_only():
    adv, _ = get_rule("rlrt").fn(signals(), RuleParams())
    row0 = [0.5 + 0.5 / 1.1, 0.9, 1.1, 1.0]  # w = exp(-Delta) = 1/1.1, 0.5, 2, 1 -> clipped 0.909, 0.8, 1.2, 1
    expected = torch.tensor([row0, [-2.0, -2.0, -2.0, 0.0], [0.0] * 4], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)


def test_antisd_is_additive_and_gated():
    adv, metrics = get_rule("antisd").fn(signals(), RuleParams(lam=0.5))
    phi = [0.5 * (math.log(1 + math.exp(d)) - math.log(2)) for d in DELTAS]
    torch.testing.assert_close(adv[0], torch.tensor([1 - 0.5 * p for p in phi], dtype=F64))
    torch.testing.assert_close(adv[2], torch.tensor([-0.5 * p for p in phi], dtype=F64))  # A = 0 still trains
    assert adv[1, 3] == 0 and metrics["antisd_gate"] == 1.0
    off, _ = get_rule("antisd").fn(signals(), RuleParams(lam=0.5, antisd_gate=0.0))
    torch.testing.assert_close(off[0], torch.ones(4, dtype=F64))


def test_antisd_gate_switches_off_and_on():
    gate = AntiSDGate(warmup=2, ratio=0.93)
    assert [gate.update(2.0), gate.update(2.0)] == [1.0, 1.0]  # warm-up: reference level 2.0
    assert gate.update(1.8) == 0.0  # below 0.93 * 2.0 = 1.86
    assert gate.update(1.9) == 1.0  # back above
    restored = AntiSDGate(warmup=2)
    restored.load_state_dict(gate.state_dict())
    assert restored.update(1.0) == 0.0


def test_egrsd_scales_rlsd_by_the_teacher_entropy_gate():
    log_v = math.log(100)
    entropy = torch.tensor([[0.0, log_v / 2, log_v, 0.0]] * 3, dtype=F64)
    adv, _ = get_rule("egrsd").fn(signals(teacher_entropy=entropy), RuleParams(egrsd_min_gate=0.1))
    rlsd_row0 = torch.tensor([1.05, 1.10, 0.90, 1.00], dtype=F64)
    torch.testing.assert_close(adv[0], rlsd_row0 * torch.tensor([1.0, 0.5, 0.1, 1.0], dtype=F64))
    assert torch.equal(adv[2], torch.zeros(4, dtype=F64))


def test_cl_egrsd_uses_the_minimum_entropy_ahead():
    log_v = math.log(100)
    entropy = torch.tensor([[log_v, 0.0, log_v, log_v]] * 3, dtype=F64)
    params = RuleParams(egrsd_min_gate=0.1, egrsd_window=2)
    adv, _ = get_rule("cl-egrsd").fn(signals(teacher_entropy=entropy), params)
    # lookahead minimum over [t, t+1]: 0, 0, log V, log V -> gates 1, 1, 0.1, 0.1
    expected = torch.tensor([1.05, 1.10, 0.90 * 0.1, 1.00 * 0.1], dtype=F64)
    torch.testing.assert_close(adv[0], expected)


@pytest.mark.parametrize(
    ("deltas", "step_weights"),
    [
        ([0.1, -0.3, 0.4, 0.8], [1.0, 1.0, 0.2 / 0.6, 0.2 / 0.6]),  # d = 0.2, 0.6
        ([0.4, 0.4, 0.1, 0.1], [1.0, 1.0, 1.2, 1.2]),  # d = 0.4, 0.1 -> 4, capped at 1 + delta
    ],
)
def test_sod_multi_step_weights(deltas, step_weights):
    student = torch.zeros(1, 4, dtype=F64)
    s = Signals(
        seq_advantages=torch.tensor([0.5], dtype=F64),
        mask=torch.ones(1, 4),
        teacher_logps=torch.tensor([deltas], dtype=F64),
        student_logps=student,
        step_ids=torch.tensor([[0, 0, 1, 1]]),
    )
    adv, _ = get_rule("sod").fn(s, RuleParams(sod_c=1.0, sod_delta=0.2, sod_eps=0.0))
    expected = torch.tensor([[0.5 + w * d for w, d in zip(step_weights, deltas, strict=True)]], dtype=F64)
    torch.testing.assert_close(adv, expected)


def test_sod_single_turn_is_grpo_plus_opsd():
    adv, _ = get_rule("sod").fn(signals(), RuleParams(sod_c=1.0))
    reference, _ = get_rule("grpo+opsd").fn(signals(), RuleParams(opsd_beta=1.0))
    torch.testing.assert_close(adv, reference)


def test_uni_opd_shifts_correct_up_and_wrong_down_by_half_the_shortfall():
    student = torch.zeros(2, 2, dtype=F64)
    s = Signals(
        seq_advantages=torch.tensor([1.0, -1.0], dtype=F64),
        mask=torch.ones(2, 2),
        teacher_logps=torch.tensor([[0.1, 0.1], [0.0, 0.0]], dtype=F64),
        student_logps=student,
        group_ids=torch.tensor([7, 7]),
    )
    adv, metrics = get_rule("uni-opd").fn(s, RuleParams(uniopd_margin=0.4))
    # margin 0.1 - 0.0 = 0.1 < 0.4: shift by 0.15 each way
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.25], [-0.15, -0.15]], dtype=F64))
    assert metrics["uniopd_shifted_groups"] == 1
    wide, _ = get_rule("uni-opd").fn(s, RuleParams(uniopd_margin=0.05))
    torch.testing.assert_close(wide, torch.tensor([[0.1, 0.1], [0.0, 0.0]], dtype=F64))  # margin met: no shift


def test_gear_segments_share_the_spike_weight():
    deltas = [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    s = Signals(
        seq_advantages=torch.tensor([1.0], dtype=F64),
        mask=torch.ones(1, 6),
        teacher_logps=torch.tensor([deltas], dtype=F64),
        student_logps=torch.zeros(1, 6, dtype=F64),
    )
    adv, metrics = get_rule("gear").fn(s, RuleParams(lam=0.5, clip=0.2, gear_spike_std=2.0))
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 1.1, 1.1, 1.1, 1.1]], dtype=F64))
    assert metrics["gear_spike_frac"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("name", list(RULES))
def test_zero_advantage_groups_multiplicative_zero_additive_not(name):
    rule = get_rule(name)
    s = signals(step_ids=torch.zeros(3, 4, dtype=torch.long))
    adv, _ = rule.fn(s, RuleParams())
    assert adv.shape == (3, 4) and torch.isfinite(adv).all()
    assert adv[1, 3] == 0  # masked position
    if rule.multiplicative:
        assert torch.equal(adv[2], torch.zeros(4, dtype=F64)), name
    elif name != "uni-opd":  # uni-opd reads Delta alone; its zero-A row keeps Delta
        assert adv[2].abs().sum() > 0, name


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(ValueError, match="rlsd, opsd, grpo\\+opsd, rlrt, antisd, egrsd, cl-egrsd, sod, uni-opd, gear"):
        get_rule("rlsd2")


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_a_training_step(tokenizer, tmp_path, name, loss_type):
    from conftest import make_config, make_dataset, make_model, parity_reward, rule_overrides

    from rlsd import RLSDTrainer

    trainer = RLSDTrainer(
        make_model(tokenizer),
        parity_reward,
        args=make_config(tmp_path, **rule_overrides(name), loss_type=loss_type, teacher="live"),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert math.isfinite(entry["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    if name != "grpo":
        assert "rlsd/adv_abs_mean" in entry


def test_a_rule_whose_signal_is_missing_is_refused_at_construction(tokenizer, tmp_path):
    from conftest import make_config, make_dataset, make_model, parity_reward

    from rlsd import RLSDTrainer

    with pytest.raises(ValueError, match=r"no privileged column 'solution'.*\['prompt'\]"):
        RLSDTrainer(
            make_model(tokenizer),
            parity_reward,
            args=make_config(tmp_path, credit="egrsd"),
            train_dataset=make_dataset().remove_columns("solution"),
            processing_class=tokenizer,
        )


def test_unknown_rule_is_refused_by_the_config(tmp_path):
    from conftest import make_config

    with pytest.raises(ValueError, match="is not one of grpo, rlsd"):
        make_config(tmp_path, credit="rlsd2")
