"""The 2026 token-credit rules built on RLSD (specification section 4, class A): pure torch, no TRL.

Each rule maps the signals it needs to (B, T) token advantages and metrics. Arithmetic is float64; masked
positions are exactly 0. A rule is registered with `@credit_rule`, which declares the signals it needs and its own
knobs (`Knob`: default, help, check); each knob becomes an `RLSDConfig` field of the same name and reaches the rule
as an attribute of `params`. Adding a rule with a new knob is one decorated function, in this file or in user code
(registered after `rlsd.config` is imported, its knob has no dataclass field: `RLSDConfig` still takes it as a keyword
argument, and a config without it reads its default). A rule with state across batches (AntiSD's gate) declares a
`RuleState` class, which the trainer drives generically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rlsd.core.credit import (
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
    teacher_contrast_logps: Tensor | None = None  # (B, T) log-mean-exp of the teacher over negative contexts
    token_labels: Tensor | None = None  # (B, T) long: the privileged source's token labels (+1 key, -1 error, 0)
    role_ids: Tensor | None = None  # (B, T) long: SRPO's token roles from the completion's tags (1, 2; 0: neither)


@dataclass(frozen=True)
class Knob:
    """A rule's own setting: its default, the help line of its `RLSDConfig` field, and a check returning an error
    message for a bad value (None when fine)."""

    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None


class RuleParams:
    """What a rule is told: RLSD's lam (this step's), clip and negative_only, shared by the rules, plus every
    registered knob (its default unless given) and the values a `RuleState` hands over for the batch."""

    def __init__(self, lam: float = 0.5, clip: float = 0.2, negative_only: bool = False, **values: Any) -> None:
        provided = {key: value for rule in RULES.values() if rule.state for key, value in rule.state.provides.items()}
        unknown = sorted(set(values) - set(KNOBS) - set(provided))
        if unknown:
            raise TypeError(f"unknown rule parameter(s) {unknown}; known: {', '.join(sorted({*KNOBS, *provided}))}")
        self.lam, self.clip, self.negative_only = lam, clip, negative_only
        for key, knob in KNOBS.items():
            setattr(self, key, knob.default)
        for key, value in {**provided, **values}.items():
            setattr(self, key, value)


class RuleState:
    """State a rule keeps across training batches. Each training batch, `observe` gets the global token means of
    the (B, T) signals named in `reads` and returns this batch's values of the parameters in `provides` (name:
    value when no state is involved); an eval batch gets `current()` and moves nothing. Built from the rule's
    parameters by `from_params`; saved in checkpoints."""

    reads: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[dict[str, float]] = {}

    @classmethod
    def from_params(cls, params: RuleParams) -> RuleState:
        raise NotImplementedError

    def observe(self, means: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def current(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


RuleFn = Callable[[Signals, RuleParams], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class CreditRule:
    """A registered rule: its function, the signals it needs, and where it comes from."""

    name: str
    fn: RuleFn
    needs: frozenset[str]
    source: str
    exact: bool
    multiplicative: bool = True  # A_i = 0 gives 0 when True
    grpo_when_lambda_zero: bool = False  # lam = 0 or eps_w = 0 make it exactly GRPO
    options: frozenset[str] = frozenset()  # honours "negative_only" and / or "span" (RLSD's options)
    knobs: tuple[str, ...] = ()  # its own `RLSDConfig` fields
    state: type[RuleState] | None = None


RULES: dict[str, CreditRule] = {}
"""Every registered rule by name: what `RLSDConfig.credit` selects from."""
KNOBS: dict[str, Knob] = {}
"""Every rule knob by its `RLSDConfig` field name."""
TEACHER = frozenset({"teacher_logps", "student_logps"})
RLSD_OPTIONS = frozenset({"negative_only", "span"})


def declare_knobs(owner: str, knobs: dict[str, Knob] | None, into: dict[str, Knob], *others: dict[str, Knob]) -> None:
    """Add `owner`'s knobs (each an `RLSDConfig` field) to the registry `into`: a name another registry (`others`)
    already declares is refused, and a name `into` holds may be declared again only identically."""
    for key, knob in (knobs or {}).items():
        if any(key in other for other in others):
            raise ValueError(f"knob {key!r} of {owner} is already another extension's knob")
        if into.get(key, knob) != knob:
            raise ValueError(f"knob {key!r} of {owner} differs from its earlier declaration")
    into.update(knobs or {})


def credit_rule(
    name: str,
    *,
    source: str,
    exact: bool,
    needs: frozenset[str] = TEACHER,
    multiplicative: bool = True,
    grpo_when_lambda_zero: bool = False,
    options: frozenset[str] = frozenset(),
    knobs: dict[str, Knob] | None = None,
    state: type[RuleState] | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """Register a rule under `name` with its needs and knobs (a knob name may be shared only with the same
    declaration)."""

    def register(fn: RuleFn) -> RuleFn:
        if name in RULES:
            raise ValueError(f"credit rule {name!r} is registered twice")
        declare_knobs(f"rule {name!r}", knobs, KNOBS)
        RULES[name] = CreditRule(name, fn, frozenset(needs), source, exact, multiplicative, grpo_when_lambda_zero,
                                 frozenset(options), tuple(knobs or {}), state)  # fmt: skip
        return fn

    return register


def _in_unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must lie in [0, 1], got {value}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


# ------------------------------------------------------------------------------------------------ the rules
@credit_rule("grpo", source="GRPO (DeepSeekMath)", exact=True, needs=frozenset())
def grpo(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """GRPO: every token of a completion gets A_i (`rlsd.core.credit.grpo_advantages`)."""
    return grpo_advantages(signals.seq_advantages, signals.mask)


@credit_rule("rlsd", source="RLSD, arXiv 2604.03128", exact=True, grpo_when_lambda_zero=True, options=RLSD_OPTIONS)
def rlsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """RLSD: A_it = A_i * ((1 - lam) + lam * clip(exp(sign(A_i) * Delta_t), 1 - eps_w, 1 + eps_w))
    (`rlsd.core.credit.rlsd_advantages`)."""
    adv, metrics = rlsd_advantages(
        signals.seq_advantages, signals.teacher_logps, signals.student_logps, signals.mask, lam=params.lam,
        clip=params.clip, negative_only=params.negative_only, span_mask=signals.span_mask,
    )  # fmt: skip
    metrics.pop("lambda")
    return adv, metrics


@credit_rule("opsd", source="OPSD (sampled token)", exact=True, multiplicative=False)
def opsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """OPSD with the sampled-token signal: A_it = Delta_t, no reward (`rlsd.core.credit.opsd_advantages`)."""
    adv, metrics = opsd_advantages(signals.teacher_logps, signals.student_logps, signals.mask)
    return adv.to(signals.seq_advantages.dtype), metrics


@credit_rule(
    "grpo+opsd",
    source="GRPO + OPSD",
    exact=True,
    multiplicative=False,
    knobs={"opsd_beta": Knob(1.0, "Weight of Delta_t in credit='grpo+opsd' (A_it = A_i + opsd_beta * Delta_t).")},
)
def grpo_opsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """GRPO + OPSD: A_it = A_i + opsd_beta * Delta_t (`rlsd.core.credit.grpo_opsd_advantages`)."""
    return grpo_opsd_advantages(
        signals.seq_advantages, signals.teacher_logps, signals.student_logps, signals.mask, beta=params.opsd_beta
    )


@credit_rule("rlrt", source="RLRT, reverse teacher signals", exact=True, grpo_when_lambda_zero=True)
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


class AntiSDGate(RuleState):
    """AntiSD's on/off gate on the teacher's mean entropy: the level of the first `warmup` updates is the
    reference; the gate turns off when the entropy falls below `ratio` x that level and on again once it is back."""

    reads: ClassVar[tuple[str, ...]] = ("teacher_entropy",)
    provides: ClassVar[dict[str, float]] = {"antisd_gate": 1.0}

    def __init__(self, warmup: int = 5, ratio: float = 0.93) -> None:
        self.warmup, self.ratio = warmup, ratio
        self.history: list[float] = []
        self.on = True

    @classmethod
    def from_params(cls, params: RuleParams) -> AntiSDGate:
        return cls(params.antisd_warmup_steps, params.antisd_ratio)

    def update(self, mean_entropy: float) -> float:
        """Feed one batch's mean teacher entropy; returns g (1.0 or 0.0) for this batch."""
        if len(self.history) < self.warmup:
            self.history.append(mean_entropy)
            return 1.0
        reference = sum(self.history) / len(self.history)
        self.on = mean_entropy >= self.ratio * reference
        return 1.0 if self.on else 0.0

    def observe(self, means: dict[str, float]) -> dict[str, float]:
        return {"antisd_gate": self.update(means["teacher_entropy"])}

    def current(self) -> dict[str, float]:
        return {"antisd_gate": 1.0 if self.on else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "on": self.on}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.on = list(state["history"]), bool(state["on"])


@credit_rule(
    "antisd",
    source="AntiSD, pointwise MI",
    exact=True,
    needs=TEACHER | {"teacher_entropy"},
    multiplicative=False,
    knobs={
        "antisd_warmup_steps": Knob(
            5, "AntiSD: rollout batches whose mean teacher entropy sets the gate's reference level.", _non_negative
        ),
        "antisd_ratio": Knob(
            0.93,
            "AntiSD: the gate is off while the teacher entropy is below this fraction of the reference level.",
            _positive,
        ),
    },
    state=AntiSDGate,
)
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


EGRSD_MIN_GATE = Knob(0.1, "EGRSD: g_min, the floor of the entropy gate 1 - H_teacher / log|V|.", _in_unit_interval)
"""The entropy gate's floor, shared by EGRSD and CL-EGRSD."""


@credit_rule(
    "egrsd",
    source="EGRSD",
    exact=False,
    needs=TEACHER | {"teacher_entropy"},
    options=RLSD_OPTIONS,
    knobs={"egrsd_min_gate": EGRSD_MIN_GATE},
)
def egrsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """EGRSD (reconstructed): A_it = A_i * m_t * g_t, m_t the RLSD multiplier and
    g_t = max(g_min, 1 - H_teacher_t / log|V|): confident teacher tokens keep their credit."""
    gate = _entropy_gate(signals.teacher_entropy, signals, params)
    return _gated_rlsd(signals, params, gate)


@credit_rule(
    "cl-egrsd",
    source="CL-EGRSD",
    exact=False,
    needs=TEACHER | {"teacher_entropy"},
    options=RLSD_OPTIONS,
    knobs={
        "egrsd_min_gate": EGRSD_MIN_GATE,
        "egrsd_window": Knob(8, "CL-EGRSD: tokens ahead over which the minimum teacher entropy is taken.", _positive),
    },
)
def cl_egrsd(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """CL-EGRSD (reconstructed): EGRSD with H_t replaced by the minimum teacher entropy over tokens t..t+W-1 of
    the completion, so that a transient low-entropy pivot token lifts the tokens that lead to it."""
    entropy = signals.teacher_entropy.double().masked_fill(~signals.mask.bool(), math.inf)
    window = params.egrsd_window
    padded = F.pad(entropy, (0, window - 1), value=math.inf)
    lookahead = -F.max_pool1d(-padded.unsqueeze(1), kernel_size=window, stride=1).squeeze(1)
    lookahead = torch.where(signals.mask.bool(), lookahead, torch.zeros_like(lookahead))
    return _gated_rlsd(signals, params, _entropy_gate(lookahead, signals, params))


@credit_rule(
    "sod",
    source="SOD",
    exact=True,
    needs=TEACHER | {"step_ids"},
    multiplicative=False,
    knobs={
        "sod_c": Knob(1.0, "SOD: weight c of the step-weighted Delta term."),
        "sod_delta": Knob(0.2, "SOD: cap 1 + delta of the step weight.", _non_negative),
        "sod_eps": Knob(1e-6, "SOD: eps in the step weight (d_1 + eps) / (d_k + eps).", _non_negative),
    },
)
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


@credit_rule(
    "uni-opd",
    source="Uni-OPD margin calibration",
    exact=True,
    needs=TEACHER | {"group_ids"},
    multiplicative=False,
    knobs={
        "uniopd_margin": Knob(
            0.4, "Uni-OPD: the margin between correct and incorrect completions' mean Delta that calibration enforces."
        )
    },
)
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


@credit_rule(
    "gear",
    source="GEAR",
    exact=False,
    grpo_when_lambda_zero=True,
    knobs={
        "gear_spike_std": Knob(
            2.0,
            "GEAR: a token is a divergence spike when |Delta| exceeds its completion's mean + this many std.",
            _non_negative,
        )
    },
)
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


# ----------------------------------------------------------------------------------------------- queries
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


def check_knobs(values: Any, knobs: dict[str, Knob] | None = None) -> None:
    """Refuse a knob value its declaration rejects, naming the flag: every rule knob, or the given `knobs`, read from
    `values` (a knob it lacks, registered after the config was built, is read as its default)."""
    for key, knob in (KNOBS if knobs is None else knobs).items():
        problem = knob.check(getattr(values, key, knob.default)) if knob.check else None
        if problem:
            raise ValueError(f"{key} {problem}")


def rule_params(values: Any, **batch_values: Any) -> RuleParams:
    """The parameters of a rule from a config (RLSD's shared fields and every knob) and this batch's values (lam,
    a state's outputs). A knob the config lacks (a rule registered outside rlsd after the config class was built)
    takes its default."""
    knobs = {key: getattr(values, key, knob.default) for key, knob in KNOBS.items()}
    return RuleParams(clip=values.rlsd_clip, negative_only=values.rlsd_negative_only, **{**knobs, **batch_values})
