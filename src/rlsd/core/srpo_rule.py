"""SRPO's credit rule (Structured Role-Aware Policy Optimization, arXiv 2605.07274) and the role spans it reads: pure
torch, no TRL.

A completion is split by its tags into perception tokens (inside `<perception>...</perception>`: the visual evidence
read from the image), reasoning tokens (inside `<think>...</think>`: what is derived from that evidence) and the rest
(tags, answer). The rule's "teacher" is a second scoring pass of the policy on a *corrupted* image
(`teacher_transform`, e.g. `"blank_images"`; no privileged context: `privileged_source="none"`, template
`"{prompt}"`), so that Delta_t = c_t - s_t, with s_t the log-prob with the original image and c_t with the corrupted
one.

Reconstruction. Only the paper's abstract could be read: perception tokens are "emphasized according to their visual
dependency under original versus corrupted visual inputs", reasoning tokens "according to their consistency with the
generated perception", the two "unified through a shared trajectory-level baseline, yielding positive token weights
that adjust relative update magnitudes while preserving the original GRPO reward and optimization direction". This
project's reading (the scores, the baseline, the clip and lam mixing are its own choices):

    z_t = s_t - c_t     on perception tokens  (visual dependency: how much the true image raises the token)
    z_t = c_t - s_t     on reasoning tokens   (consistency: with the image corrupted, the generated perception is the
                                               only evidence left; a reasoning token that stays as likely follows
                                               from the perception, one that falls read the image past it)
    b_i = mean of z_t over the role tokens of completion i        (one baseline shared by both roles)
    w_t = clip(exp(z_t - b_i), 1 - eps_w, 1 + eps_w)   on role tokens, 1 on every other token
    A_it = A_i * ((1 - lam) + lam * w_t)                 (lam and eps_w: RLSD's schedule and clip)

w_t > 0, so the sign of A_it is A_i's (A_i = 0 gives 0); lam = 0 or eps_w = 0 is GRPO; a completion without either
span keeps A_i on every token (counted in `rlsd/srpo_untagged_frac`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from rlsd.core.credit import TokenMean, _advantage_metrics, _masked_mean, token_delta
from rlsd.core.rules import TEACHER, Knob, RuleParams, Signals, credit_rule

PERCEPTION, REASONING = 1, 2
"""The role labels of `Signals.role_ids` (0: neither)."""
_TAG = re.compile(r"[A-Za-z][\w-]*")


def _tag_name(value: Any) -> str | None:
    if isinstance(value, str) and _TAG.fullmatch(value):
        return None
    return f"must be a tag name such as 'think', got {value!r}"


SRPO_KNOBS = {
    "srpo_perception_tag": Knob(
        "perception", "SRPO: the tag of the perception span (<tag>...</tag>); its tokens are weighted by visual "
        "dependency.", _tag_name,
    ),
    "srpo_reasoning_tag": Knob(
        "think", "SRPO: the tag of the reasoning span (<tag>...</tag>); its tokens are weighted by consistency with "
        "the perception.", _tag_name,
    ),
}  # fmt: skip


def role_char_spans(text: str, perception_tag: str, reasoning_tag: str) -> list[tuple[int, int, int]]:
    """The (start, end, role) character spans of the contents of each `<tag>...</tag>` pair in `text` (the tags
    themselves outside); an opened span never closed (a truncated completion) runs to the end of the text."""
    spans = []
    for tag, role in ((perception_tag, PERCEPTION), (reasoning_tag, REASONING)):
        open_tag, close_tag = f"<{tag}>", f"</{tag}>"
        cursor = 0
        while (opened := text.find(open_tag, cursor)) >= 0:
            start = opened + len(open_tag)
            closed = text.find(close_tag, start)
            end = closed if closed >= 0 else len(text)
            if end > start:
                spans.append((start, end, role))
            cursor = end + len(close_tag) if closed >= 0 else len(text)
    return sorted(spans)


def role_masks(role_ids: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """The (B, T) bool masks of the completion's (`active`) perception and reasoning tokens."""
    return active & (role_ids == PERCEPTION), active & (role_ids == REASONING)


def centred_scores(delta: Tensor, role_ids: Tensor, active: Tensor) -> Tensor:
    """z_t - b_i: -Delta_t on perception tokens, Delta_t on reasoning tokens, less their completion's mean over both
    roles (the shared baseline); 0 on every other token (`delta` (B, T) = c_t - s_t, `active` the completion mask)."""
    perception, reasoning = role_masks(role_ids, active)
    roles = perception | reasoning
    score = torch.where(perception, -delta, torch.where(reasoning, delta, torch.zeros_like(delta)))
    baseline = (score * roles).sum(1, keepdim=True) / roles.sum(1, keepdim=True).clamp(min=1)
    return torch.where(roles, score - baseline, torch.zeros_like(score))


def check_srpo_config(config: Any) -> None:
    """credit='srpo' contrasts the policy on the original and a corrupted input: a teacher transform must corrupt it
    (an image transform; on text, e.g. `mask_digits`), and the teacher must see no privileged context (it would enter
    c_t)."""
    if config.credit != "srpo":
        return
    if config.teacher_transform is None:
        raise ValueError(
            "credit='srpo' weighs perception tokens by log p(original image) - log p(corrupted image): set "
            "teacher_transform to the corruption (e.g. 'blank_images', 'noise_images', 'blur_images'; on text "
            "'mask_digits')"
        )
    if config.privileged_source != "none":
        raise ValueError(
            f"credit='srpo' with privileged_source={config.privileged_source!r}: its second pass is the policy on the "
            "corrupted input alone; set privileged_source='none' and teacher_template='{prompt}'"
        )


@credit_rule(
    "srpo",
    source="SRPO, arXiv 2605.07274",
    exact=False,
    needs=TEACHER | {"role_ids"},
    grpo_when_lambda_zero=True,
    knobs=SRPO_KNOBS,
)
def srpo(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """SRPO (reconstructed, see the module docstring): role scores z_t (s_t - c_t on perception tokens, c_t - s_t on
    reasoning tokens, c_t the log-prob on the corrupted input), less their completion's mean over both roles,
    w_t = clip(exp(z_t - b_i), 1 - eps, 1 + eps), A_it = A_i * ((1 - lam) + lam * w_t) on role tokens, A_i
    elsewhere."""
    role_ids = signals.role_ids if signals.role_ids is not None else torch.zeros_like(signals.mask, dtype=torch.long)
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)  # c_t - s_t
    active = signals.mask.bool()
    perception, reasoning = role_masks(role_ids, active)
    roles = perception | reasoning
    weight = torch.exp(centred_scores(delta, role_ids, active))
    clipped = weight.clamp(1.0 - params.clip, 1.0 + params.clip)
    multiplier = torch.where(roles, (1.0 - params.lam) + params.lam * clipped, torch.ones_like(weight))
    adv = signals.seq_advantages.double().unsqueeze(1)
    token_adv = (adv * multiplier).masked_fill(~active, 0.0)
    n_rows = int(active.any(1).sum().item())
    untagged = int((~roles.any(1) & active.any(1)).sum().item())
    metrics = {
        "srpo_perception_frac": _masked_mean(perception.double(), active),
        "srpo_reasoning_frac": _masked_mean(reasoning.double(), active),
        "srpo_untagged_frac": TokenMean(untagged / max(n_rows, 1), n_rows),
        "srpo_visual_dependency_mean": _masked_mean(-delta, perception),
        "srpo_consistency_mean": _masked_mean(delta, reasoning),
        "weight_mean": _masked_mean(weight, roles),
        "weight_clipped_mean": _masked_mean(clipped, roles),
        **_advantage_metrics(token_adv, signals.mask),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(signals.seq_advantages.dtype), metrics
