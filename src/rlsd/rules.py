"""The 2026 token-credit rules built on RLSD (specification section 4, class A): pure torch, no TRL.

Each rule maps the signals it needs to (B, T) token advantages and metrics. Arithmetic is float64; masked
positions are exactly 0. `RULES` is the registry that `RLSDConfig.credit` selects from, together with the four
base rules of `rlsd.credit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rlsd.credit import (
    _advantage_metrics,
    _delta_metrics,
    _masked_mean,
    grpo_advantages,
    grpo_opsd_advantages,
    opsd_advantages,
    rlsd_advantages,
    token_delta,
)


@dataclass
class Signals:
    """What a rule may read. Only the fields a rule declares in `needs` are guaranteed to be set."""

    seq_advantages: Tensor  # (B,)
    mask: Tensor  # (B, T)
    teacher_logps: Tensor | None = None  # (B, T) tau_t
    student_logps: Tensor | None = None  # (B, T) s_t
    teacher_entropy: Tensor | None = None  # (B, T) H of the teacher's next-token distribution
    group_ids: Tensor | None = None  # (B,) which prompt each completion answers
    step_ids: Tensor | None = None  # (B, T) index of the assistant segment (step) of each token
    vocab_size: int | None = None
    span_mask: Tensor | None = None  # (B, T) tokens a rule with the "span" option may reweight (None: all)


@dataclass
class RuleParams:
    """Knobs of every rule, with the papers' defaults (mirrored by `RLSDConfig` fields)."""

    lam: float = 0.5
    clip: float = 0.2
    negative_only: bool = False
    opsd_beta: float = 1.0
    antisd_gate: float = 1.0  # g: 1 (on) or 0 (off), decided by `AntiSDGate`
    egrsd_min_gate: float = 0.1  # g_min
    egrsd_window: int = 8  # W of CL-EGRSD
    sod_c: float = 1.0
    sod_delta: float = 0.2
    sod_eps: float = 1e-6
    uniopd_margin: float = 0.4
    gear_spike_std: float = 2.0


@dataclass(frozen=True)
class CreditRule:
    """A registered rule: its function, the signals it needs, and where it comes from."""

    name: str
    fn: Callable[[Signals, RuleParams], tuple[Tensor, dict[str, float]]]
    needs: frozenset[str]
    source: str
    exact: bool
    multiplicative: bool = field(default=True)  # A_i = 0 gives 0 when True
    grpo_when_lambda_zero: bool = field(default=False)  # lam = 0 or eps_w = 0 make it exactly GRPO
    options: frozenset[str] = field(default=frozenset())  # honours "negative_only" and / or "span" (RLSD's options)


# ------------------------------------------------------------------------------------------------ the rules
def rlrt(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """RLRT, reverse teacher signals (exact per a third-party re-implementation).

    A_i > 0: A_it = A_i * ((1 - lam) + lam * clip(exp(-Delta_t), 1 - eps, 1 + eps)), i.e. RLSD with Delta negated,
    boosting tokens the teacher would not have predicted. A_i <= 0: A_it = A_i.
    """
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)
    active = signals.mask.bool()
    adv = signals.seq_advantages.double().unsqueeze(1)
    weight = torch.exp(-delta)
    clipped = weight.clamp(1.0 - params.clip, 1.0 + params.clip)
    reweighted = active & (adv > 0)
    multiplier = torch.where(reweighted, (1.0 - params.lam) + params.lam * clipped, torch.ones_like(weight))
    token_adv = (adv * multiplier).masked_fill(~active, 0.0)
    metrics = {
        **_delta_metrics(delta, adv, active),
        **_advantage_metrics(token_adv, signals.mask),
        "weight_mean": _masked_mean(weight, reweighted),
        "weight_clipped_mean": _masked_mean(clipped, reweighted),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(signals.seq_advantages.dtype), metrics


def antisd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """AntiSD, pointwise mutual information (exact per two notes): A_it = A_i - lam * g * phi(Delta_t),
    phi(u) = 0.5 * (softplus(u) - log 2). Additive: it trains even when A_i = 0. g is the entropy gate."""
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)
    phi = 0.5 * (F.softplus(delta) - math.log(2.0))
    adv = signals.seq_advantages.double().unsqueeze(1)
    active = signals.mask.bool()
    token_adv = (adv - params.lam * params.antisd_gate * phi).masked_fill(~active, 0.0)
    metrics = {
        **_delta_metrics(delta, adv, active),
        **_advantage_metrics(token_adv, signals.mask),
        "antisd_gate": float(params.antisd_gate),
        "nonfinite_count": float(nonfinite),
    }
    return token_adv.to(signals.seq_advantages.dtype), metrics


def egrsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """EGRSD (reconstructed): A_it = A_i * m_t * g_t, m_t the RLSD multiplier and
    g_t = max(g_min, 1 - H_teacher_t / log|V|): confident teacher tokens keep their credit."""
    gate = _entropy_gate(signals.teacher_entropy, signals, params)
    return _gated_rlsd(signals, params, gate)


def cl_egrsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """CL-EGRSD (reconstructed): EGRSD with H_t replaced by the minimum teacher entropy over tokens t..t+W-1 of
    the completion, so that a transient low-entropy pivot token lifts the tokens that lead to it."""
    entropy = signals.teacher_entropy.double().masked_fill(~signals.mask.bool(), math.inf)
    window = params.egrsd_window
    padded = F.pad(entropy, (0, window - 1), value=math.inf)
    lookahead = -F.max_pool1d(-padded.unsqueeze(1), kernel_size=window, stride=1).squeeze(1)
    lookahead = torch.where(signals.mask.bool(), lookahead, torch.zeros_like(lookahead))
    return _gated_rlsd(signals, params, _entropy_gate(lookahead, signals, params))


def sod(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """SOD (exact): A_it = A_i + c * w_k(t) * Delta_t with w_k = min((d_1 + eps) / (d_k + eps), 1 + delta) and
    d_k the mean |Delta| over step k of the completion (a step = one assistant segment between tool outputs).
    A single-turn completion is one step, w = 1, and SOD is GRPO + OPSD(sampled) with beta = c."""
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)
    active = signals.mask.bool()
    steps = signals.step_ids if signals.step_ids is not None else torch.zeros_like(signals.mask, dtype=torch.long)
    num_steps = int(steps.max().item()) + 1 if steps.numel() else 1
    one_hot = F.one_hot(steps.long().clamp(min=0), num_steps).double() * active.unsqueeze(-1)  # (B, T, K)
    counts = one_hot.sum(1)  # (B, K)
    d = (one_hot * delta.abs().unsqueeze(-1)).sum(1) / counts.clamp(min=1)  # (B, K)
    first = d[:, :1]
    weights = torch.minimum((first + params.sod_eps) / (d + params.sod_eps), torch.tensor(1.0 + params.sod_delta))
    token_weight = (one_hot * weights.unsqueeze(1)).sum(-1)  # (B, T)
    adv = signals.seq_advantages.double().unsqueeze(1)
    token_adv = (adv + params.sod_c * token_weight * delta).masked_fill(~active, 0.0)
    metrics = {**_delta_metrics(delta, adv, active), **_advantage_metrics(token_adv, signals.mask)}
    metrics["sod_step_weight_mean"] = _masked_mean(token_weight, active)
    metrics["nonfinite_count"] = float(nonfinite)
    return token_adv.to(signals.seq_advantages.dtype), metrics


def uni_opd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """Uni-OPD margin calibration (exact): a_it = Delta_t; per group, with m = mean over correct completions
    (A_i > 0) of their token-mean a minus the same over incorrect ones (A_i < 0), if m < delta, correct
    completions shift up and incorrect ones down by (delta - m) / 2 each."""
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)
    active = signals.mask.bool()
    seq_mean = (delta * active).sum(1) / active.sum(1).clamp(min=1)
    shift = torch.zeros_like(seq_mean)
    shifted_groups = 0
    for group in torch.unique(signals.group_ids):
        members = signals.group_ids == group
        correct, wrong = members & (signals.seq_advantages > 0), members & (signals.seq_advantages < 0)
        if not correct.any() or not wrong.any():
            continue
        margin = seq_mean[correct].mean() - seq_mean[wrong].mean()
        if margin < params.uniopd_margin:
            half = (params.uniopd_margin - margin) / 2
            shift[correct], shift[wrong] = half, -half
            shifted_groups += 1
    token_adv = (delta + shift.unsqueeze(1)).masked_fill(~active, 0.0)
    adv = signals.seq_advantages.double().unsqueeze(1)
    metrics = {**_delta_metrics(delta, adv, active), **_advantage_metrics(token_adv, signals.mask)}
    metrics["uniopd_shifted_groups"] = float(shifted_groups)
    metrics["nonfinite_count"] = float(nonfinite)
    return token_adv.to(signals.seq_advantages.dtype), metrics


def gear(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """GEAR (reconstructed): a token whose |Delta| exceeds its completion's mean + k * std is a spike; the spike
    and every token after it up to the next spike form a segment that shares the spike's clipped RLSD weight.
    Tokens before the first spike keep weight 1. A_it = A_i * ((1 - lam) + lam * w_segment)."""
    delta, nonfinite = token_delta(signals.teacher_logps, signals.student_logps, signals.mask)
    active = signals.mask.bool()
    count = active.sum(1, keepdim=True).clamp(min=1)
    mean = (delta.abs() * active).sum(1, keepdim=True) / count
    std = (((delta.abs() - mean) ** 2) * active).sum(1, keepdim=True).div(count).sqrt()
    spikes = active & (delta.abs() > mean + params.gear_spike_std * std)
    adv = signals.seq_advantages.double().unsqueeze(1)
    weight = torch.exp(torch.sign(adv) * delta).clamp(1 - params.clip, 1 + params.clip)
    positions = torch.arange(delta.size(1), device=delta.device).expand_as(delta)
    last_spike = torch.where(spikes, positions, torch.full_like(positions, -1)).cummax(1).values
    segment_weight = torch.where(last_spike >= 0, weight.gather(1, last_spike.clamp(min=0)), torch.ones_like(weight))
    token_adv = (adv * ((1 - params.lam) + params.lam * segment_weight)).masked_fill(~active, 0.0)
    metrics = {**_delta_metrics(delta, adv, active), **_advantage_metrics(token_adv, signals.mask)}
    metrics["gear_spike_frac"] = _masked_mean(spikes.double(), active)
    metrics["nonfinite_count"] = float(nonfinite)
    return token_adv.to(signals.seq_advantages.dtype), metrics


# ------------------------------------------------------------------------------------------------- helpers
def _entropy_gate(entropy: Tensor, signals: Signals, params: RuleParams) -> Tensor:
    """g_t = max(g_min, 1 - H_t / log|V|)."""
    if signals.vocab_size is None or signals.vocab_size < 2:
        raise ValueError("the entropy gate needs the vocabulary size")
    return (1.0 - entropy.double() / math.log(signals.vocab_size)).clamp(min=params.egrsd_min_gate, max=1.0)


def _gated_rlsd(signals: Signals, params: RuleParams, gate: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The RLSD token advantages times a (B, T) gate; with `negative_only` or a span mask, the tokens RLSD leaves
    alone keep A_i (no gate either)."""
    token_adv, metrics = rlsd_advantages(
        signals.seq_advantages.double(),
        signals.teacher_logps,
        signals.student_logps,
        signals.mask,
        lam=params.lam,
        clip=params.clip,
        negative_only=params.negative_only,
        span_mask=signals.span_mask,
    )
    if params.negative_only:
        gate = torch.where((signals.seq_advantages < 0).unsqueeze(1), gate, torch.ones_like(gate))
    if signals.span_mask is not None:
        gate = torch.where(signals.span_mask.bool(), gate, torch.ones_like(gate))
    token_adv = token_adv * gate
    metrics.pop("lambda")
    metrics.update(_advantage_metrics(token_adv, signals.mask))
    metrics["entropy_gate_mean"] = _masked_mean(gate, signals.mask.bool())
    return token_adv.to(signals.seq_advantages.dtype), metrics


class AntiSDGate:
    """AntiSD's on/off gate on the teacher's mean entropy: the level of the first `warmup` updates is the
    reference; the gate turns off when the entropy falls below `ratio` x that level and on again once it is back."""

    def __init__(self, warmup: int = 5, ratio: float = 0.93) -> None:
        self.warmup, self.ratio = warmup, ratio
        self.history: list[float] = []
        self.on = True

    def update(self, mean_entropy: float) -> float:
        """Feed one batch's mean teacher entropy; returns g (1.0 or 0.0) for this batch."""
        if len(self.history) < self.warmup:
            self.history.append(mean_entropy)
            return 1.0
        reference = sum(self.history) / len(self.history)
        self.on = mean_entropy >= self.ratio * reference
        return 1.0 if self.on else 0.0

    def state_dict(self) -> dict:
        return {"history": self.history, "on": self.on}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.on = list(state["history"]), bool(state["on"])


# ----------------------------------------------------------------------------------------------- registry
def _base(fn_name: str) -> Callable[[Signals, RuleParams], tuple[Tensor, dict[str, float]]]:
    """Adapters of the four base rules of `rlsd.credit` to the registry's signature."""

    def grpo(s: Signals, p: RuleParams):
        return grpo_advantages(s.seq_advantages, s.mask)

    def rlsd(s: Signals, p: RuleParams):
        adv, metrics = rlsd_advantages(
            s.seq_advantages, s.teacher_logps, s.student_logps, s.mask, lam=p.lam, clip=p.clip,
            negative_only=p.negative_only, span_mask=s.span_mask,
        )  # fmt: skip
        metrics.pop("lambda")
        return adv, metrics

    def opsd(s: Signals, p: RuleParams):
        adv, metrics = opsd_advantages(s.teacher_logps, s.student_logps, s.mask)
        return adv.to(s.seq_advantages.dtype), metrics

    def grpo_opsd(s: Signals, p: RuleParams):
        return grpo_opsd_advantages(s.seq_advantages, s.teacher_logps, s.student_logps, s.mask, beta=p.opsd_beta)

    return {"grpo": grpo, "rlsd": rlsd, "opsd": opsd, "grpo+opsd": grpo_opsd}[fn_name]


TEACHER = frozenset({"teacher_logps", "student_logps"})
RLSD_OPTIONS = frozenset({"negative_only", "span"})
RULES: dict[str, CreditRule] = {
    rule.name: rule
    for rule in (
        CreditRule("grpo", _base("grpo"), frozenset(), "GRPO (DeepSeekMath)", True),
        CreditRule(
            "rlsd",
            _base("rlsd"),
            TEACHER,
            "RLSD, arXiv 2604.03128",
            True,
            grpo_when_lambda_zero=True,
            options=RLSD_OPTIONS,
        ),
        CreditRule("opsd", _base("opsd"), TEACHER, "OPSD (sampled token)", True, multiplicative=False),
        CreditRule("grpo+opsd", _base("grpo+opsd"), TEACHER, "GRPO + OPSD", True, multiplicative=False),
        CreditRule("rlrt", rlrt, TEACHER, "RLRT, reverse teacher signals", True, grpo_when_lambda_zero=True),
        CreditRule("antisd", antisd, TEACHER | {"teacher_entropy"}, "AntiSD, pointwise MI", True, False),
        CreditRule("egrsd", egrsd, TEACHER | {"teacher_entropy"}, "EGRSD", False, options=RLSD_OPTIONS),
        CreditRule("cl-egrsd", cl_egrsd, TEACHER | {"teacher_entropy"}, "CL-EGRSD", False, options=RLSD_OPTIONS),
        CreditRule("sod", sod, TEACHER | {"step_ids"}, "SOD", True, multiplicative=False),
        CreditRule("uni-opd", uni_opd, TEACHER | {"group_ids"}, "Uni-OPD margin calibration", True, False),
        CreditRule("gear", gear, TEACHER, "GEAR", False, grpo_when_lambda_zero=True),
    )
}


def check_rule_options(name: str, *, negative_only: bool, span: bool) -> None:
    """Refuse RLSD's options (`rlsd_negative_only`, `rlsd_span`) for a rule that would silently ignore them."""
    for option, used in (("negative_only", negative_only), ("span", span)):
        if used and option not in get_rule(name).options:
            honouring = ", ".join(rule.name for rule in RULES.values() if option in rule.options)
            raise ValueError(f"credit={name!r} does not honour rlsd_{option}; the rules that do: {honouring}")


def get_rule(name: str) -> CreditRule:
    """The registered rule `name`; an unknown name is refused with the known ones listed."""
    if name not in RULES:
        raise ValueError(f"unknown credit rule {name!r}; known rules: {', '.join(RULES)}")
    return RULES[name]
