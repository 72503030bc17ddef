"""GUI-SD's distillation loss (on-policy self-distillation for GUI grounding, arXiv 2605.00642): pure torch.

The paper (abstract and project page) weights each token's teacher-student divergence by "digit significance and
teacher confidence", with the teacher, the same weights as the student, shown the screen with the target's box drawn
and a Gaussian soft mask (a visual hint that leaks no coordinate: `rlsd.context.transforms`' `draw_box`,
`gaussian_mask`, `box_hint`). Its exact formulas are not published in what could be read; the ones here are
reconstructions (README, "GUI-SD"):

    w_t = sig_t * sg(p_T(y_t)),   L_t = w_t * JSD_beta(p_T,t || p_S,t)

    sig_t    digit significance: a token whose (first) digit is the k-th (0-based, from the left) of a number of n
             digits in the completion text gets (n - k) / n (leading digit 1, last 1/n: an error in the leading digit
             of a coordinate moves the click furthest); a token without a digit gets `text_weight`;
    p_T(y_t) the teacher's probability of the sampled token at the (temperature-scaled) logits: its confidence.

The project page names the divergence as the reverse KL; the JSD's beta (`distill_jsd_beta`) spans it (beta = 1) and
the project's symmetric default (0.5). The significance reads the completion's text, so the distillation term
(`rlsd.step.distill_term`) computes it from the decoded tokens (`TextWeightedLoss.text_weights`) and the per-token loss
here carries the confidence and the divergence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from rlsd.core.distill import JSD_BETA, Knob, TokenLoss, _jsd_from_logprobs, distill_loss
from rlsd.core.family_losses import SampledLogitsLoss


@dataclass(frozen=True)
class TextWeightedLoss(SampledLogitsLoss):
    """A `SampledLogitsLoss` whose tokens the distillation term also weights by a function of the completion's text:
    `text_weights(pieces)` maps each token's decoded text (one completion) to its weight."""

    text_weights: Callable[[Sequence[str]], list[float]] = lambda pieces: [1.0] * len(pieces)


def digit_significance(pieces: Sequence[str], text_weight: float = 1.0) -> list[float]:
    """Each token's digit significance in the completion whose tokens decode to `pieces`: (n - k) / n when its first
    digit is digit k (0-based, from the left) of a run of n digits of the whole text (a number may span tokens),
    `text_weight` for a token without a digit."""
    text = "".join(pieces)
    place: list[tuple[int, int]] = []  # (k, n) of each character; n = 0 outside every number
    index = 0
    while index < len(text):
        end = index
        while end < len(text) and text[end].isdigit():
            end += 1
        if end == index:
            place.append((0, 0))
            index += 1
            continue
        place += [(k, end - index) for k in range(end - index)]
        index = end
    weights, start = [], 0
    for piece in pieces:
        digits = [place[i] for i in range(start, start + len(piece)) if place[i][1]]
        weights.append((digits[0][1] - digits[0][0]) / digits[0][1] if digits else text_weight)
        start += len(piece)
    return weights


def gui_sd_token_loss(
    student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor, beta: float = 0.5
) -> Tensor:
    """sg(p_T(y_t)) * JSD_beta(p_T || p_S) per token, from the student's logits (..., V) (with gradient), the
    teacher's (detached) and the sampled tokens y_t (...): the teacher-confidence half of GUI-SD's weight (the
    digit significance multiplies it in the distillation term). The caller takes the token mean."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    log_s = F.log_softmax(student_logits, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach(), dim=-1)
    confidence = log_t.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1).exp()
    return confidence * _jsd_from_logprobs(log_s, log_t, beta)


def _non_negative(value: object) -> str | None:
    """A finite number >= 0 (a bool is not a number here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and math.isfinite(value) and value >= 0 else f"must be a finite number >= 0, got {value!r}"


@distill_loss(
    "gui_sd",
    knobs={
        "distill_jsd_beta": JSD_BETA,
        "gui_sd_text_weight": Knob(
            1.0, "distill_loss='gui_sd': the significance of a completion token without a digit (a digit's is "
            "(n - k) / n, k its place from the left in a number of n digits); 1 weighs the answer's format like a "
            "leading digit (a malformed answer misses the box as surely).", _non_negative,
        ),
    },
)  # fmt: skip
def _gui_sd(distill_jsd_beta: float, gui_sd_text_weight: float) -> TokenLoss:
    """GUI-SD (arXiv 2605.00642, weights reconstructed): the JSD per token weighted by digit significance times the
    teacher's probability of the sampled token (`gui_sd_token_loss`, `digit_significance`)."""
    return TextWeightedLoss(
        functools.partial(gui_sd_token_loss, beta=distill_jsd_beta),
        functools.partial(digit_significance, text_weight=gui_sd_text_weight),
    )
