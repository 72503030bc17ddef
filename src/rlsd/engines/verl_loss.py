"""RLSD's credit as the per-token term of verl's distillation-loss seam: pure torch, no verl, no TRL.

verl (0.9.1, `distillation_ppo_loss` with `use_policy_gradient` and `use_task_rewards`, `distillation_loss_coef` 1)
adds to its task policy gradient, driven by the token advantages A_i, a second policy gradient driven by
-loss_t. With one update per rollout batch (the PPO ratio is 1, so both surrogates are linear in their advantage)
the update is the policy gradient of A_i - loss_t. Returning

    loss_t = A_i - A_it = A_i * lam * (1 - clip(w_t, 1 - eps_w, 1 + eps_w))     (reweighted tokens; 0 elsewhere)

with A_it RLSD's token advantage (`rlsd.core.credit.rlsd_advantages`) makes that update RLSD's."""

from __future__ import annotations

import torch
from torch import Tensor

from rlsd.core.credit import DEFAULT_RLSD_CLIP, DEFAULT_RLSD_LAMBDA, rlsd_advantages

ROW_TOLERANCE = 1e-6
"""Token advantages of one response may differ by this much (relative) and still count as one A_i."""


def row_advantages(token_advantages: Tensor, mask: Tensor) -> Tensor:
    """A_i (B,) from verl's (B, T) token advantages, which an outcome estimator (GRPO, RLOO, ...) broadcasts over the
    response; token advantages that vary within a response (a critic's GAE) have no A_i and are refused."""
    active = mask.bool()
    values = token_advantages.detach().double()
    count = active.sum(dim=1).clamp(min=1)
    mean = (values * active).sum(dim=1) / count
    deviation = (values - mean.unsqueeze(1)).abs().masked_fill(~active, 0.0)
    spread = deviation.amax(dim=1) if deviation.size(1) else torch.zeros_like(mean)
    if bool((spread > ROW_TOLERANCE * (1.0 + mean.abs())).any()):
        raise ValueError(
            "the rlsd distillation loss needs one advantage per response (an outcome estimator such as GRPO's); "
            f"got token advantages that vary within a response by up to {spread.max().item():.3g}"
        )
    return mean


def rlsd_distillation_losses(
    token_advantages: Tensor,
    teacher_logps: Tensor,
    student_logps: Tensor,
    mask: Tensor,
    *,
    lam: float = DEFAULT_RLSD_LAMBDA,
    clip: float = DEFAULT_RLSD_CLIP,
) -> tuple[Tensor, dict[str, float]]:
    """(B, T) loss_t = A_i - A_it in float32 (0 outside `mask`) and RLSD's metrics under `distillation/rlsd_`, from
    padded (B, T) token advantages and the sampled tokens' teacher and student log-probs (all stop-gradient)."""
    seq_advantages = row_advantages(token_advantages, mask)
    token_adv, metrics = rlsd_advantages(seq_advantages, teacher_logps, student_logps, mask, lam=lam, clip=clip)
    losses = (seq_advantages.unsqueeze(1) * mask.double() - token_adv).masked_fill(~mask.bool(), 0.0)
    named = {f"distillation/rlsd_{key}": float(value) for key, value in metrics.items()}
    return losses.to(torch.float32), named
