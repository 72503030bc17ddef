"""Token-level credit assignment: pure torch functions, no TRL.

Every function maps sequence-level advantages A_i (B,) and, where needed, the sampled-token log-probs of the
privileged teacher and of the student (B, T) to token advantages A_it (B, T) that a clipped policy-gradient
surrogate consumes. Arithmetic is done in float64; the result comes back in the dtype of `seq_advantages`.
Positions outside `mask` are exactly 0. Notation follows `algorithms.md` section 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DELTA_BOUND = 20.0
"""Delta_t is clamped to [-DELTA_BOUND, DELTA_BOUND]; exp(20) is far beyond any clip range in use."""
DEFAULT_RLSD_LAMBDA = 0.5
"""lam_0, `RLSDConfig.rlsd_lambda`'s default (here so that engines without TRL read the same value)."""
DEFAULT_RLSD_CLIP = 0.2
"""eps_w, `RLSDConfig.rlsd_clip`'s default."""


class TokenMean(float):
    """A metric that is a mean over `count` tokens (or rows): a float carrying its count, so that the trainer can
    combine processes by a count-weighted mean, as TRL's global masked mean does."""

    count: float

    def __new__(cls, value: float, count: float) -> TokenMean:
        metric = super().__new__(cls, value)
        metric.count = float(count)
        return metric

    def __getnewargs__(self) -> tuple[float, float]:
        return float(self), self.count


def rlsd_lambda(step: int, *, lam0: float, warmup_steps: int = 0, decay_steps: int = 0) -> float:
    """Mixing weight lam_k of RLSD at optimizer step `step` (k >= 1), section 2.1.

    Warm-up (k <= W): lam_k = lam0 * k / W. lam0 is reached once, at the peak step P = max(W, 1); then it decays
    over D steps: lam_k = lam0 * max(0, 1 - (k - P) / D), so step P + D gets 0 (W = 0: lam0 at k = 1, 0 at
    k = D + 1; W = 3, D = 5: lam0/3, 2 lam0/3, lam0, 0.8 lam0, ...). D = 0 keeps lam0 for the whole run.
    """
    if step < 1:
        raise ValueError(f"step counts optimizer steps from 1, got {step}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"warmup_steps and decay_steps must be >= 0, got {warmup_steps} and {decay_steps}")
    if step <= warmup_steps:
        return lam0 * step / warmup_steps
    if decay_steps == 0:
        return lam0
    steps_after_peak = step - max(warmup_steps, 1)
    return lam0 * max(0.0, 1.0 - steps_after_peak / decay_steps)


def think_span_mask(
    pieces: Sequence[Sequence[str]], width: int, open_tag: str = "<think>", close_tag: str = "</think>"
) -> Tensor:
    """(B, width) bool: the tokens whose text lies inside the reasoning span, between `open_tag` and the next
    `close_tag` (the tags' own tokens are outside), from the decoded tokens `pieces` of each completion.

    Without `open_tag` the span starts at the completion's start when a `close_tag` follows (the prompt opened
    it), and there is no span without either tag; without `close_tag` it runs to the end (a truncated completion).
    """
    mask = torch.zeros(len(pieces), width, dtype=torch.bool)
    for row, tokens in enumerate(pieces):
        text = "".join(tokens)
        opened = text.find(open_tag)
        begin = opened + len(open_tag) if opened >= 0 else 0
        closed = text.find(close_tag, begin)
        if opened < 0 and closed < 0:
            continue
        end = closed if closed >= 0 else len(text)
        start = 0
        for column, token in enumerate(tokens[:width]):
            stop = start + len(token)
            mask[row, column] = begin <= start and stop <= end
            start = stop
    return mask


def token_delta(teacher_logps: Tensor, student_logps: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Delta_t = stopgrad(tau_t - s_t) in float64, made finite, and the count of non-finite masked entries.

    NaN becomes 0 (a neutral weight of 1); +-inf and large values are clamped to +-DELTA_BOUND.
    """
    _check_shapes(teacher_logps, student_logps, mask)
    delta = teacher_logps.detach().double() - student_logps.detach().double()
    active = mask.bool()
    nonfinite = int((~torch.isfinite(delta) & active).sum().item())
    delta = torch.nan_to_num(delta, nan=0.0, posinf=DELTA_BOUND, neginf=-DELTA_BOUND)
    delta = delta.clamp(-DELTA_BOUND, DELTA_BOUND)
    return delta.masked_fill(~active, 0.0), nonfinite


def grpo_advantages(seq_advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """GRPO: A_it = A_i on every completion token (section 1)."""
    if seq_advantages.dim() != 1 or seq_advantages.size(0) != mask.size(0):
        raise ValueError(f"seq_advantages must be (B,) with B={mask.size(0)}, got {tuple(seq_advantages.shape)}")
    token_adv = seq_advantages.double().unsqueeze(1) * mask.double()
    return token_adv.to(seq_advantages.dtype), _advantage_metrics(token_adv, mask)


def rlsd_advantages(
    seq_advantages: Tensor,
    teacher_logps: Tensor,
    student_logps: Tensor,
    mask: Tensor,
    *,
    lam: float,
    clip: float,
    negative_only: bool = False,
    span_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """RLSD token advantages, exact (section 2.1).

        Delta_t = clamp(tau_t - s_t, -20, 20)          (stop-gradient)
        w_t     = exp(sign(A_i) * Delta_t)
        A_it    = A_i * ((1 - lam) + lam * clip(w_t, 1 - clip, 1 + clip))

    Tokens outside `span_mask`, and with `negative_only` the completions with A_i >= 0, keep A_it = A_i.
    Metrics (weights and clip fractions over the reweighted tokens): delta_mean, delta_pos_mean, delta_neg_mean,
    weight_mean, weight_clipped_mean, clip_low_frac, clip_high_frac, lambda, adv_mean, adv_abs_mean,
    nonfinite_count.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"clip must lie in [0, 1), got {clip}")
    delta, nonfinite = token_delta(teacher_logps, student_logps, mask)
    adv = seq_advantages.detach().double().unsqueeze(1)
    active = mask.bool()
    reweighted = active & (adv != 0)
    if negative_only:
        reweighted = reweighted & (adv < 0)
    if span_mask is not None:
        if span_mask.shape != mask.shape:
            raise ValueError(f"span_mask must have the mask's shape {tuple(mask.shape)}, got {tuple(span_mask.shape)}")
        reweighted = reweighted & span_mask.bool()

    weight = torch.exp(torch.sign(adv) * delta)
    clipped = weight.clamp(1.0 - clip, 1.0 + clip)
    multiplier = torch.where(reweighted, (1.0 - lam) + lam * clipped, torch.ones_like(weight))
    token_adv = (adv * multiplier).masked_fill(~active, 0.0)

    metrics = {
        **_delta_metrics(delta, adv, active),
        "weight_mean": _masked_mean(weight, reweighted),
        "weight_clipped_mean": _masked_mean(clipped, reweighted),
        "clip_low_frac": _masked_mean((weight < 1.0 - clip).double(), reweighted),
        "clip_high_frac": _masked_mean((weight > 1.0 + clip).double(), reweighted),
        "lambda": float(lam),
        **_advantage_metrics(token_adv, mask),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(seq_advantages.dtype), metrics


def opsd_advantages(teacher_logps: Tensor, student_logps: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """OPSD, sampled-token form (section 3.1): A_it = Delta_t; the reward is ignored.

    With the clipped surrogate this is the score-function gradient of the reverse KL(p_S || p_T) on sampled tokens.
    """
    delta, nonfinite = token_delta(teacher_logps, student_logps, mask)
    zeros = torch.zeros(mask.size(0), dtype=torch.float64, device=mask.device)
    metrics = {
        **_delta_metrics(delta, zeros.unsqueeze(1), mask.bool()),
        **_advantage_metrics(delta, mask),
        "nonfinite_count": float(nonfinite),
    }
    return delta.to(student_logps.dtype), metrics


def grpo_opsd_advantages(
    seq_advantages: Tensor, teacher_logps: Tensor, student_logps: Tensor, mask: Tensor, *, beta: float
) -> tuple[Tensor, dict[str, float]]:
    """GRPO + OPSD, additive (section 3.2): A_it = A_i + beta * Delta_t."""
    delta, nonfinite = token_delta(teacher_logps, student_logps, mask)
    adv = seq_advantages.detach().double().unsqueeze(1)
    token_adv = (adv + beta * delta).masked_fill(~mask.bool(), 0.0)
    metrics = {
        **_delta_metrics(delta, adv, mask.bool()),
        **_advantage_metrics(token_adv, mask),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(seq_advantages.dtype), metrics


def _check_shapes(teacher_logps: Tensor, student_logps: Tensor, mask: Tensor) -> None:
    """Fail with both shapes named when the (B, T) inputs disagree."""
    if teacher_logps.shape != student_logps.shape or student_logps.shape != mask.shape or mask.dim() != 2:
        raise ValueError(
            "teacher_logps, student_logps and mask must all be (B, T); got "
            f"{tuple(teacher_logps.shape)}, {tuple(student_logps.shape)} and {tuple(mask.shape)}"
        )


def _masked_mean(values: Tensor, where: Tensor) -> TokenMean:
    """Mean of `values` over `where`, carrying its token count; NaN when `where` is empty (TRL's logger skips NaN)."""
    count = int(where.sum().item())
    if count == 0:
        return TokenMean(math.nan, 0)
    return TokenMean(values.double().masked_select(where.bool()).mean().item(), count)


def _delta_metrics(delta: Tensor, adv: Tensor, active: Tensor) -> dict[str, float]:
    """Mean Delta over all completion tokens and over completions with A > 0 and A < 0."""
    return {
        "delta_mean": _masked_mean(delta, active),
        "delta_pos_mean": _masked_mean(delta, active & (adv > 0)),
        "delta_neg_mean": _masked_mean(delta, active & (adv < 0)),
    }


def _advantage_metrics(token_adv: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and mean absolute token advantage over completion tokens."""
    active = mask.bool()
    return {"adv_mean": _masked_mean(token_adv, active), "adv_abs_mean": _masked_mean(token_adv.abs(), active)}
