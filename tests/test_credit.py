"""Hand-computed values for every credit function in `rlsd.core.credit`."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd.core.credit import (
    DELTA_BOUND,
    grpo_advantages,
    grpo_opsd_advantages,
    opsd_advantages,
    rlsd_advantages,
    rlsd_lambda,
    token_delta,
)

F64 = torch.float64
STUDENT = math.log(0.5)
# Delta per column: ln 1.1 (inside the clip range), ln 2 (above), ln 0.5 (below), 0 (neutral).
DELTAS = [math.log(1.1), math.log(2.0), math.log(0.5), 0.0]


def batch():
    """Three completions: A = +1, -2, 0; the second has its last token masked out."""
    seq = torch.tensor([1.0, -2.0, 0.0], dtype=F64)
    student = torch.full((3, 4), STUDENT, dtype=F64)
    teacher = student + torch.tensor(DELTAS, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    return seq, teacher, student, mask


def test_grpo_broadcasts_sequence_advantage_and_zeroes_padding():
    seq, _, _, mask = batch()
    adv, metrics = grpo_advantages(seq, mask)
    expected = torch.tensor([[1, 1, 1, 1], [-2, -2, -2, 0], [0, 0, 0, 0]], dtype=F64)
    assert torch.equal(adv, expected)
    assert metrics["adv_abs_mean"] == pytest.approx((4 * 1 + 3 * 2) / 11)


def test_rlsd_hand_computed_values_and_clipping_at_both_ends():
    seq, teacher, student, mask = batch()
    adv, metrics = rlsd_advantages(seq, teacher, student, mask, lam=0.5, clip=0.2)
    # A = +1: w = 1.1, 2, 0.5, 1 -> clipped 1.1, 1.2, 0.8, 1 -> multiplier 0.5 + 0.5 * w~.
    row0 = [1.05, 1.10, 0.90, 1.00]
    # A = -2: w = 1/1.1, 0.5, 2, 1 -> clipped 0.90909, 0.8, 1.2, 1; the last token is masked.
    row1 = [-2 * (0.5 + 0.5 / 1.1), -2 * 0.9, -2 * 1.1, 0.0]
    expected = torch.tensor([row0, row1, [0.0] * 4], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # Reweighted tokens: 4 of row 0 and 3 of row 1; each row has one clipped low and one clipped high.
    assert metrics["clip_high_frac"] == pytest.approx(2 / 7)
    assert metrics["clip_low_frac"] == pytest.approx(2 / 7)
    assert metrics["weight_mean"] == pytest.approx((1.1 + 2 + 0.5 + 1 + 1 / 1.1 + 0.5 + 2) / 7)
    assert metrics["weight_clipped_mean"] == pytest.approx((1.1 + 1.2 + 0.8 + 1 + 1 / 1.1 + 0.8 + 1.2) / 7)
    assert metrics["delta_pos_mean"] == pytest.approx(sum(DELTAS) / 4)
    assert metrics["delta_neg_mean"] == pytest.approx(sum(DELTAS[:3]) / 3)
    assert metrics["lambda"] == 0.5
    assert metrics["nonfinite_count"] == 0


def test_rlsd_keeps_the_sign_of_the_verifier():
    torch.manual_seed(0)
    seq = torch.randn(16, dtype=F64)
    teacher, student = torch.randn(16, 9, dtype=F64) * 5, torch.randn(16, 9, dtype=F64) * 5
    adv, _ = rlsd_advantages(seq, teacher, student, torch.ones(16, 9), lam=1.0, clip=0.5)
    assert torch.equal(torch.sign(adv), torch.sign(seq).unsqueeze(1).expand_as(adv))


def test_rlsd_zero_advantage_gives_zero_and_clip_zero_is_grpo():
    seq, teacher, student, mask = batch()
    adv, _ = rlsd_advantages(seq, teacher, student, mask, lam=0.5, clip=0.0)
    grpo, _ = grpo_advantages(seq, mask)
    assert torch.equal(adv, grpo)
    assert torch.equal(adv[2], torch.zeros(4, dtype=F64))


def test_rlsd_negative_only_leaves_positive_completions_alone():
    seq, teacher, student, mask = batch()
    adv, _ = rlsd_advantages(seq, teacher, student, mask, lam=0.5, clip=0.2, negative_only=True)
    assert torch.equal(adv[0], torch.ones(4, dtype=F64))
    torch.testing.assert_close(adv[1, 1], torch.tensor(-1.8, dtype=F64))


def test_rlsd_span_mask_limits_reweighting():
    seq, teacher, student, mask = batch()
    span = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    adv, metrics = rlsd_advantages(seq, teacher, student, mask, lam=0.5, clip=0.2, span_mask=span)
    expected = torch.tensor([[1.0, 1.1, 1.0, 1.0], [-2.0, -1.8, -2.2, 0.0], [0.0] * 4], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert metrics["clip_high_frac"] == pytest.approx(2 / 3)


def test_rlsd_nonfinite_logprobs_give_finite_advantages_and_are_counted():
    seq, teacher, student, mask = batch()
    teacher[0, 0] = float("nan")
    teacher[1, 1] = float("inf")
    student[1, 2] = float("inf")
    teacher[1, 3] = float("nan")  # masked: not counted
    adv, metrics = rlsd_advantages(seq, teacher, student, mask, lam=0.5, clip=0.2)
    assert torch.isfinite(adv).all()
    assert metrics["nonfinite_count"] == 3
    assert adv[0, 0].item() == pytest.approx(1.0)  # NaN -> Delta 0 -> neutral weight
    assert adv[1, 1].item() == pytest.approx(-2 * 0.9)  # +inf -> Delta +20 -> w = e^-20 -> clipped to 0.8
    assert adv[1, 2].item() == pytest.approx(-2 * 1.1)  # student +inf -> Delta -20 -> w = e^20 -> 1.2


def test_token_delta_clamps_to_the_bound():
    delta, count = token_delta(torch.tensor([[0.0, -100.0]]), torch.tensor([[-100.0, 0.0]]), torch.ones(1, 2))
    assert delta.tolist() == [[DELTA_BOUND, -DELTA_BOUND]]
    assert count == 0


@pytest.mark.parametrize(
    ("step", "warmup", "decay", "expected"),
    [
        (1, 0, 50, 0.5),  # first step: lam_0
        (26, 0, 50, 0.25),  # mid-decay
        (50, 0, 50, 0.01),  # last step of the decay
        (51, 0, 50, 0.0),  # end of decay
        (500, 0, 50, 0.0),  # beyond
        (2, 4, 50, 0.25),  # warm-up
        (4, 4, 50, 0.5),
        (5, 4, 50, 0.49),  # lam_0 is reached once, at k = W; the decay starts at the next step
        (29, 4, 50, 0.25),
        (1000, 0, 0, 0.5),  # no decay: constant
    ],
)
def test_lambda_schedule(step, warmup, decay, expected):
    assert rlsd_lambda(step, lam0=0.5, warmup_steps=warmup, decay_steps=decay) == pytest.approx(expected)


def test_lambda_schedule_rejects_step_zero():
    with pytest.raises(ValueError, match="from 1"):
        rlsd_lambda(0, lam0=0.5)


def test_opsd_is_delta_and_ignores_reward():
    _, teacher, student, mask = batch()
    adv, metrics = opsd_advantages(teacher, student, mask)
    expected = torch.tensor(DELTAS, dtype=F64).repeat(3, 1) * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert metrics["delta_mean"] == pytest.approx((3 * sum(DELTAS) - DELTAS[3]) / 11)


def test_grpo_plus_opsd_is_additive():
    seq, teacher, student, mask = batch()
    adv, _ = grpo_opsd_advantages(seq, teacher, student, mask, beta=0.5)
    expected = (seq.unsqueeze(1) + 0.5 * torch.tensor(DELTAS, dtype=F64)) * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv[2, 1].item() == pytest.approx(0.5 * math.log(2.0))  # A = 0 still trains: additive


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_delta(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_result_keeps_the_advantage_dtype():
    seq, teacher, student, mask = batch()
    adv, _ = rlsd_advantages(seq.float(), teacher.float(), student.float(), mask, lam=0.5, clip=0.2)
    assert adv.dtype == torch.float32
