"""RLCSD's credit rule (Reinforcement Learning with Contrastive On-Policy Self-Distillation, arXiv 2606.11709) and the
log-mean-exp that combines its negative teacher passes: pure torch, no TRL.

The teacher scores each completion twice over: after a correct sibling (`teacher_logps`) and after each of K wrong
ones, whose log-mean-exp is `teacher_contrast_logps` (`privileged_source="contrast"`, `rlsd.context.contrast`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlsd.core.credit import _advantage_metrics, _masked_mean, token_delta
from rlsd.core.rules import TEACHER, Knob, RuleParams, Signals, _non_negative, _positive, credit_rule


def _non_positive(value: float) -> str | None:
    return None if value <= 0 else f"must be <= 0, got {value}"


RLCSD_KNOBS = {
    "rlcsd_tau": Knob(0.02, "RLCSD: temperature of the squash tanh(e_ctr / tau).", _positive),
    "rlcsd_beta": Knob(1.0, "RLCSD: scale of the modulation r_t = beta * lam * tanh(e_ctr / tau).", _non_negative),
    "rlcsd_delta": Knob(0.02, "RLCSD: a token is modulated only where |r_t| > delta (the threshold mask).",
                        _non_negative),
    "rlcsd_eta": Knob(1.0, "RLCSD: weight of the modulated tokens' advantage (the paper's second loss path).",
                      _non_negative),
    "rlcsd_residual_clip_low": Knob(-2.0, "RLCSD: lower bound of r_t (<= 0).", _non_positive),
    "rlcsd_residual_clip_high": Knob(2.0, "RLCSD: upper bound of r_t (>= 0).", _non_negative),
}  # fmt: skip
"""RLCSD's knobs with the defaults of the paper's configs (configs/*/*_rlcsd.yaml); its lam is the shared `lam`."""


def log_mean_exp(logps: Tensor, valid: Tensor) -> Tensor:
    """log (1 / K_b) sum_k exp(logps[k, b, t]) over the passes k that are valid for row b (`logps` (K, B, T), `valid`
    (K, B) bool): the log-prob of the uniform mixture of each row's negative contexts; 0 for a row with none."""
    valid = valid.to(logps.device).bool()
    count = valid.sum(0)
    masked = logps.double().masked_fill(~valid.unsqueeze(-1), -math.inf)
    mixed = torch.logsumexp(masked, dim=0) - count.clamp(min=1).double().log().unsqueeze(-1)
    return torch.where((count > 0).unsqueeze(-1), mixed, torch.zeros_like(mixed)).to(logps.dtype)


@credit_rule(
    "rlcsd",
    source="RLCSD, arXiv 2606.11709",
    exact=True,
    needs=TEACHER | {"teacher_contrast_logps"},
    knobs=RLCSD_KNOBS,
)
def rlcsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """RLCSD (exact per the authors' code, `compute_policy_loss_rlcsd`):
    e_ctr_t = log pi_T(y_t | x, y+, y_<t) - log (1/K) sum_k pi_T(y_t | x, y-_k, y_<t),
    r_t = clip(beta * lam * tanh(e_ctr_t / tau), low, high), m_t = [|r_t| > delta],
    A_it = A_i + m_t * r_t clamped to keep A_i's sign (max(0, .) when A_i > 0, min(0, .) when A_i < 0, 0 when
    A_i = 0), times eta on the modulated tokens. The paper normalises its modulated and unmodulated tokens' PPO losses
    separately (loss = L_unmodulated + eta * L_modulated); here both stay in TRL's one loss, so eta weighs the
    modulated tokens' advantage instead (the same loss up to that normalisation)."""
    active = signals.mask.bool()
    e_ctr, nonfinite = token_delta(signals.teacher_logps, signals.teacher_contrast_logps, signals.mask)
    residual = (params.rlcsd_beta * params.lam * torch.tanh(e_ctr / params.rlcsd_tau)).clamp(
        params.rlcsd_residual_clip_low, params.rlcsd_residual_clip_high
    )
    modulated = active & (residual.abs() > params.rlcsd_delta)
    adv = signals.seq_advantages.double().unsqueeze(1)
    raw = adv + torch.where(modulated, residual, torch.zeros_like(residual))
    kept = torch.where(adv > 0, raw.clamp(min=0.0), torch.where(adv < 0, raw.clamp(max=0.0), torch.zeros_like(raw)))
    token_adv = torch.where(modulated, params.rlcsd_eta * kept, kept).masked_fill(~active, 0.0)
    metrics = {
        "e_ctr_mean": _masked_mean(e_ctr, active),
        "e_ctr_abs_mean": _masked_mean(e_ctr.abs(), active),
        "rlcsd_modulated_frac": _masked_mean(modulated.double(), active),
        "rlcsd_residual_mean": _masked_mean(residual, modulated),
        **_advantage_metrics(token_adv, signals.mask),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(signals.seq_advantages.dtype), metrics
