"""Distillation losses over full next-token distributions (specification sections 3.1, 3.3, 3.4): pure torch.

Every function takes the student's logits (with gradient) and the teacher's logits (no gradient) at the same
completion positions, (B, T, V), and returns a per-token loss (B, T). The gradient flows into the student only:
the teacher's logits are detached here whatever the caller passes. Callers chunk over tokens for a large
vocabulary (`chunked_token_loss`) so that no (B, T, V) float64 tensor is ever held. A loss that reads only the
sampled token's log-probs (SDAR) is a `SampledTokenLoss`: the kernels hand it the sampled ids of the same positions.

What `RLSDConfig.distill_loss` selects is registered here with `@distill_loss`, with its knobs (`rlsd.core.rules.Knob`:
default, help, check), each of which becomes an `RLSDConfig` field and a stage field of the same name; adding a loss
with a knob is one decorated function, here or in user code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial
from torch.utils.checkpoint import checkpoint

from rlsd.core.rules import KNOBS, Knob, declare_knobs


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence per token, exactly TRL's GKD (`GKDTrainer.generalized_jsd_loss`, GKD
    paper eq. 1, with P = p_T and Q = p_S):

        JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),   M = beta * p_T + (1 - beta) * p_S,

    symmetric at beta = 0.5. beta = 0 is forward KL(p_T || p_S) and beta = 1 reverse KL(p_S || p_T), as in TRL.
    Near the ends JSD_beta ~ beta * KL(p_T || p_S) and ~ (1 - beta) * KL(p_S || p_T): the value shrinks with the
    weight (TRL's special cases are the limits of JSD_beta / beta and JSD_beta / (1 - beta)), the direction does not.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    log_s = F.log_softmax(student_logits, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach(), dim=-1)
    return _jsd_from_logprobs(log_s, log_t, beta)


def _jsd_from_logprobs(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """The divergence of `generalized_jsd` from normalized log-probabilities: the mixture weighs the teacher by beta
    (M = (1 - beta) * p_S + beta * p_T, TRL's GKD), so that beta -> 0 tends to forward KL's direction."""
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]), dim=0)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def topk_jsd(student_logits: Tensor, teacher_logits: Tensor, k: int, beta: float = 0.5, tail: bool = True) -> Tensor:
    """`generalized_jsd` restricted to the teacher's top-k tokens, renormalized; with `tail`, the remaining
    probability mass of each distribution forms one extra bucket (no renormalization needed then)."""
    teacher_logits = teacher_logits.detach()
    top = teacher_logits.topk(k, dim=-1).indices
    log_s = F.log_softmax(student_logits, dim=-1).gather(-1, top)
    log_t = F.log_softmax(teacher_logits, dim=-1).gather(-1, top)
    if tail:
        log_s, log_t = _with_tail(log_s), _with_tail(log_t)
    else:
        log_s, log_t = log_s.log_softmax(-1), log_t.log_softmax(-1)
    return _jsd_from_logprobs(log_s, log_t, beta)


def _with_tail(log_probs: Tensor) -> Tensor:
    """Append log(1 - sum p) as a bucket, computed stably with log1p(-exp(logsumexp))."""
    mass = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([log_probs, torch.log(-torch.expm1(mass))], dim=-1)


def teacher_top1_ce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cross-entropy towards argmax p_T (the variant that leaks most)."""
    target = teacher_logits.detach().argmax(-1, keepdim=True)
    return -F.log_softmax(student_logits, dim=-1).gather(-1, target).squeeze(-1)


def student_top1_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Reverse KL restricted to the support {argmax p_S} (the variant that leaks least; the project's reading):
    p_S(a) * (log p_S(a) - log p_T(a)) with a = argmax p_S."""
    log_s = F.log_softmax(student_logits, dim=-1)
    top = log_s.detach().argmax(-1, keepdim=True)
    log_s_a = log_s.gather(-1, top).squeeze(-1)
    log_t_a = F.log_softmax(teacher_logits.detach(), dim=-1).gather(-1, top).squeeze(-1)
    return log_s_a.exp() * (log_s_a - log_t_a)


def sdpg_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """SDPG's distillation term: KL(p_S || stopgrad p_T) over the full vocabulary (reverse KL)."""
    return generalized_jsd(student_logits, teacher_logits, beta=1.0)


def sdpg_ref_penalty(student_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """SDPG's anchor on sampled tokens: 0.5 * (log pi_theta - log pi_ref)^2."""
    return 0.5 * (student_logps - ref_logps.detach()) ** 2


def sdar_token_loss(student_logps: Tensor, teacher_logps: Tensor, beta: float = 5.0) -> Tensor:
    """SDAR's gated auxiliary loss per token (Self-Distilled Agentic RL, arXiv 2605.15155, as ms-swift 4.6 adds it to
    GRPO), on the sampled token's log-probs s_t (student, with gradient) and tau_t (teacher):

        g_t * Delta_t,   Delta_t = tau_t - s_t,   g_t = sigmoid(beta * Delta_t)   (g_t and tau_t stop-gradient)

    so that d/ds_t = -g_t: the student's log-prob of a token is raised in proportion to how much the teacher endorses
    it (g_t -> 1 where tau_t >> s_t, -> 0 where the teacher rejects it). The caller takes the token mean."""
    delta = teacher_logps.detach() - student_logps
    return torch.sigmoid(beta * delta.detach()) * delta


def topk_overlap(student_logits: Tensor, teacher_logits: Tensor, k: int) -> Tensor:
    """Rethinking-OPD's diagnostic per token: |TopK(p_S) & TopK(p_T)| / k, the share of the teacher's k most likely
    next tokens that are also among the student's k most likely (softmax keeps the order: the logits' top-k sets;
    k is capped at the vocabulary size). No gradient."""
    k = min(k, student_logits.size(-1))
    top_s = student_logits.detach().topk(k, dim=-1).indices
    top_t = teacher_logits.detach().topk(k, dim=-1).indices
    shared = (top_s.unsqueeze(-1) == top_t.unsqueeze(-2)).any(-1).sum(-1)
    return shared.float() / k


@dataclass
class OverlapProbe:
    """Collects `topk_overlap` of each chunk while `chunked_token_loss` projects it, from the logits it builds anyway
    (no second projection); a checkpointed chunk recomputed in the backward pass is not counted twice."""

    k: int
    chunks: dict[int, Tensor] = field(default_factory=dict)

    def record(self, index: int, student_logits: Tensor, teacher_logits: Tensor) -> None:
        if index not in self.chunks:
            with torch.no_grad():
                self.chunks[index] = topk_overlap(student_logits, teacher_logits, self.k)

    def values(self) -> Tensor:
        """The per-token overlaps of every chunk, in token order (N,)."""
        return torch.cat([self.chunks[i] for i in sorted(self.chunks)])


TokenLoss = Callable[[Tensor, Tensor], Tensor]
"""A per-token loss: (student logits (..., V) with gradient, teacher logits (..., V)) -> (...)."""


@dataclass(frozen=True)
class SampledTokenLoss:
    """A per-token loss that reads only the log-probs of the sampled tokens: `fn(student_logps (...) with gradient,
    teacher_logps (...)) -> (...)`. Called as a `TokenLoss` plus the sampled ids (...) of the same positions, which
    the kernels (`chunked_token_loss`, `selected_token_loss`, `mad_opd_token_loss`) pass to it; it gathers both
    log-probs from the (temperature-scaled) logits, the teacher's detached."""

    fn: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor | None = None) -> Tensor:
        if sampled_ids is None:
            raise ValueError("this distillation loss reads the sampled tokens: pass their ids (sampled_ids)")
        index = sampled_ids.unsqueeze(-1)
        log_s = F.log_softmax(student_logits, dim=-1).gather(-1, index).squeeze(-1)
        log_t = F.log_softmax(teacher_logits.detach(), dim=-1).gather(-1, index).squeeze(-1)
        return self.fn(log_s, log_t)


def _token_loss(loss_fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, ids: Tensor | None) -> Tensor:
    """`loss_fn` at these positions: a `SampledTokenLoss` also gets their sampled ids."""
    return loss_fn(student, teacher, ids) if isinstance(loss_fn, SampledTokenLoss) else loss_fn(student, teacher)


@dataclass(frozen=True)
class DistillLoss:
    """A registered distillation loss: `build(**knob values) -> TokenLoss` (keyword arguments named as its knobs,
    the `RLSDConfig` fields), its knobs, its `distill_coef` when left unset, and its one-line description."""

    name: str
    build: Callable[..., TokenLoss]
    knobs: tuple[str, ...]
    default_coef: float
    doc: str


LOSSES: dict[str, DistillLoss] = {}
"""Every registered distillation loss by name: what `RLSDConfig.distill_loss` selects from (besides "none")."""
LOSS_KNOBS: dict[str, Knob] = {}
"""Every distillation knob by its `RLSDConfig` field name (also a field a stage may set)."""


def distill_loss(
    name: str, *, knobs: dict[str, Knob] | None = None, default_coef: float = 1.0, doc: str = ""
) -> Callable[[Callable[..., TokenLoss]], Callable[..., TokenLoss]]:
    """Register the factory of the per-token loss `name`: it takes the values of its `knobs` (each an `RLSDConfig`
    field of that name, declared once here; a name may be shared only with the same declaration) as keyword
    arguments. Adding a loss with knobs is this one decorated function, here or in user code."""

    def register(build: Callable[..., TokenLoss]) -> Callable[..., TokenLoss]:
        if name in LOSSES or name == "none":
            raise ValueError(f"distillation loss {name!r} is registered twice (or is 'none')")
        declare_knobs(f"distillation loss {name!r}", knobs, LOSS_KNOBS, KNOBS)
        summary = doc or " ".join((build.__doc__ or "").split())
        LOSSES[name] = DistillLoss(name, build, tuple(knobs or {}), default_coef, summary)
        return build

    return register


def get_distill_loss(name: str) -> DistillLoss:
    """The registered loss `name`; an unknown name is refused with the known ones listed."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; the known ones are {', '.join(LOSSES)}")
    return LOSSES[name]


def token_loss_fn(name: str, values: Any = None, **knobs: Any) -> TokenLoss:
    """The per-token loss `(student_logits, teacher_logits) -> (N,)` of `RLSDConfig.distill_loss = name`, built
    with its knobs' values: from `knobs` (by field name), else from `values` (a config, or any object holding them
    as attributes), else their declared defaults (a loss registered after the config was built)."""
    loss = get_distill_loss(name)
    unknown = sorted(set(knobs) - set(LOSS_KNOBS))
    if unknown:
        raise TypeError(f"unknown distillation knob(s) {unknown}; known: {', '.join(LOSS_KNOBS)}")
    chosen = {key: knobs[key] if key in knobs else getattr(values, key, LOSS_KNOBS[key].default) for key in loss.knobs}
    return loss.build(**chosen)


def _unit_interval(value: Any) -> str | None:
    """A number in [0, 1] (a bool is not a number here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and 0.0 <= value <= 1.0 else f"must lie in [0, 1], got {value!r}"


def _positive_integer(value: Any) -> str | None:
    """An integer >= 1 (a bool is not one here)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    return None if integer and value >= 1 else f"must be an integer >= 1, got {value!r}"


def _boolean(value: Any) -> str | None:
    """True or False (1 and "yes" are refused: a stage list comes from JSON)."""
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


JSD_BETA = Knob(
    0.5,
    "beta of the generalized JSD (TRL's GKD): 0 is forward KL(p_T || p_S), 1 is reverse KL(p_S || p_T); in between "
    "the mixture M = beta * p_T + (1 - beta) * p_S.",
    _unit_interval,
)


@distill_loss("jsd", knobs={"distill_jsd_beta": JSD_BETA})
def _jsd(distill_jsd_beta: float) -> TokenLoss:
    """Generalized JSD over the full vocabulary (`generalized_jsd`), beta = `distill_jsd_beta`."""
    return functools.partial(generalized_jsd, beta=distill_jsd_beta)


@distill_loss(
    "topk_jsd",
    knobs={
        "distill_jsd_beta": JSD_BETA,
        "distill_topk": Knob(
            100, "k of distill_loss='topk_jsd': the divergence is taken over the teacher's k most likely tokens.",
            _positive_integer,
        ),
        "distill_tail": Knob(
            True, "With distill_loss='topk_jsd', the remaining probability mass of each distribution forms one extra "
            "bucket; without it, both top-k distributions are renormalized.", _boolean,
        ),
    },
)  # fmt: skip
def _topk_jsd(distill_jsd_beta: float, distill_topk: int, distill_tail: bool) -> TokenLoss:
    """The generalized JSD over the teacher's top `distill_topk` tokens (`topk_jsd`, tail bucket: `distill_tail`)."""
    return functools.partial(topk_jsd, k=distill_topk, beta=distill_jsd_beta, tail=distill_tail)


@distill_loss("teacher_top1")
def _teacher_top1() -> TokenLoss:
    """Cross-entropy to argmax p_T (`teacher_top1_ce`)."""
    return teacher_top1_ce


@distill_loss("student_top1")
def _student_top1() -> TokenLoss:
    """Reverse KL on argmax p_S (`student_top1_kl`)."""
    return student_top1_kl


@distill_loss("sdpg", default_coef=0.001)
def _sdpg() -> TokenLoss:
    """SDPG (arXiv 2606.04036): KL(p_S || sg p_T) over the full vocabulary (`sdpg_kl`) plus `sdpg_ref_coef` * 0.5
    (log pi / pi_ref)^2 on sampled tokens; its default coefficient is the paper's beta."""
    return sdpg_kl


def _positive_finite(value: Any) -> str | None:
    """A finite number > 0 (a bool is not a number here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and math.isfinite(value) and value > 0 else f"must be a finite number > 0, got {value!r}"


@distill_loss(
    "sdar",
    knobs={
        "sdar_gate_beta": Knob(
            5.0, "beta of the gate sigmoid(beta * Delta_t) of distill_loss='sdar' (ms-swift's sdar_gate_beta): the "
            "larger, the sharper; tokens the teacher rejects (Delta_t < 0) weigh less.", _positive_finite,
        ),
    },
    default_coef=0.1,
)  # fmt: skip
def _sdar(sdar_gate_beta: float) -> TokenLoss:
    """SDAR (arXiv 2605.15155, ms-swift 4.6's sdar_loss_coef / sdar_gate_beta): the gated auxiliary loss sg(sigmoid(
    beta * Delta_t)) * Delta_t on the sampled tokens (`sdar_token_loss`), Delta_t = tau_t - s_t; its default
    coefficient is the value ms-swift documents for the reference (its own field default, 0, turns SDAR off)."""
    return SampledTokenLoss(functools.partial(sdar_token_loss, beta=sdar_gate_beta))


def chunked_token_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    chunk_tokens: int = 1024,
    overlap: OverlapProbe | None = None,
    sampled_ids: Tensor | None = None,
) -> Tensor:
    """Per-token loss from hidden states (B, T, H), projecting to logits `chunk_tokens` positions at a time.

    Each chunk is checkpointed: its logits are freed after the forward and recomputed in the backward pass, so
    that only (chunk, V) logits exist at any time, in the backward pass too. An `overlap` probe records the top-k
    overlap of each chunk's two distributions (flattened token order). `sampled_ids` (B, T), the completion's
    tokens, go to a `SampledTokenLoss`."""
    batch, length = student_hidden.shape[:2]
    flat_s = student_hidden.reshape(batch * length, -1)
    flat_t = teacher_hidden.reshape(batch * length, -1)
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(batch * length)

    def piece(hidden_s: Tensor, hidden_t: Tensor, index: int, ids: Tensor | None) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(hidden_t)
        student_logits = student_head(hidden_s)
        if overlap is not None:
            overlap.record(index, student_logits, teacher_logits)
        return _token_loss(loss_fn, student_logits, teacher_logits, ids)

    recompute = torch.is_grad_enabled() and flat_s.requires_grad
    pieces = []
    for index, start in enumerate(range(0, flat_s.size(0), chunk_tokens)):
        chunk_s, chunk_t = flat_s[start : start + chunk_tokens], flat_t[start : start + chunk_tokens]
        ids = None if flat_ids is None else flat_ids[start : start + chunk_tokens]
        if recompute:
            chunk = checkpoint(piece, chunk_s, chunk_t, index, ids, use_reentrant=False)
        else:
            chunk = piece(chunk_s, chunk_t, index, ids)
        pieces.append(chunk)
    return torch.cat(pieces).view(batch, length)


class _GatherSharded(torch.autograd.Function):
    """All-gather of a DTensor parameter whose backward averages the full gradient over the mesh and scatters it
    back to the parameter's placements, as FSDP2 reduces its own gradients (sum over ranks / data-parallel size)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: DTensor) -> Tensor:  # type: ignore[override]
        ctx.spec = (weight.device_mesh, weight.placements, weight.shape, weight.stride())  # type: ignore[attr-defined]
        return weight.full_tensor()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> DTensor:  # type: ignore[override]
        mesh, placements, shape, stride = ctx.spec  # type: ignore[attr-defined]
        partial = [Partial("sum")] * mesh.ndim
        local = grad.contiguous() / mesh.size()
        return DTensor.from_local(local, mesh, partial, shape=shape, stride=stride).redistribute(mesh, placements)


def gather_sharded(weight: Tensor) -> Tensor:
    """The full tensor of an FSDP2-sharded (DTensor) parameter, gathered once (no gradient when grad is off or the
    parameter is frozen); its gradient is reduce-scattered averaged over ranks like FSDP2's. Plain tensors pass."""
    if not isinstance(weight, DTensor):
        return weight
    if not (torch.is_grad_enabled() and weight.requires_grad):
        with torch.no_grad():
            return weight.full_tensor()
    return _GatherSharded.apply(weight)


@dataclass(frozen=True)
class HeadLogits:
    """Hidden states -> float32 logits / temperature through an LM head whose weights were gathered once."""

    weight: Tensor
    bias: Tensor | None
    temperature: float
    sharded: bool

    def __call__(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float() / self.temperature

    def zero(self) -> Tensor:
        """A differentiable 0 through the gathered weights, so that a rank with no token to distill still runs the
        gradient collectives of the others; a plain 0 (no gradient) when nothing was gathered."""
        if not self.sharded:
            return self.weight.new_zeros(())
        parts = [self.weight] if self.bias is None else [self.weight, self.bias]
        return sum((p.sum() * 0.0 for p in parts), self.weight.new_zeros(()))

    def detached(self) -> HeadLogits:
        """The same head without gradient (a live teacher shares the student's head: no second gather)."""
        bias = None if self.bias is None else self.bias.detach()
        return HeadLogits(self.weight.detach(), bias, self.temperature, self.sharded)


def head_logits(head: nn.Module, temperature: float, *, grad: bool = True) -> HeadLogits:
    """`head`'s logits function, with an FSDP2-sharded weight (and bias) gathered here once per micro-batch on every
    rank, whatever its token count, and reused by all chunks and recomputes (per-chunk gathers desynchronize ranks)."""
    weight, bias = head.weight, head.bias
    sharded = isinstance(weight, DTensor) or isinstance(bias, DTensor)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        weight = gather_sharded(weight)
        bias = gather_sharded(bias) if bias is not None else None
    return HeadLogits(weight, bias, temperature, sharded)


def selected_token_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    selected: Tensor,
    heads: tuple[nn.Module, nn.Module],
    temperature: float,
    chunk_tokens: int = 1024,
    overlap: OverlapProbe | None = None,
    sampled_ids: Tensor | None = None,
) -> Tensor:
    """Per-token loss (N,) at the `selected` (B, T) positions of the (B, T, H) hidden states, through the (student,
    teacher) LM heads. Under FSDP2 the heads are gathered once here on every rank whatever N; with N = 0 the empty
    result still leads back to the hidden states and the gathered head, so all ranks run the same collectives.
    `overlap` (optional) collects the per-token top-k overlap of the same N tokens; `sampled_ids` (B, T), the
    completion's tokens, are what a `SampledTokenLoss` reads."""
    student = head_logits(heads[0], temperature)
    teacher = student.detached() if heads[1] is heads[0] else head_logits(heads[1], temperature, grad=False)
    if not selected.any():
        return (student_hidden.sum() * 0.0 + student.zero()).expand(0)
    flat_s, flat_t = student_hidden[selected].unsqueeze(0), teacher_hidden[selected].unsqueeze(0)
    ids = None if sampled_ids is None else sampled_ids[selected].unsqueeze(0)
    return chunked_token_loss(
        loss_fn, flat_s, flat_t, student, teacher, chunk_tokens=chunk_tokens, overlap=overlap, sampled_ids=ids
    ).squeeze(0)


# ------------------------------------------------------------------------------------- MAD-OPD (several teachers)
MAD_CONFIDENCES = ("sampled_logp", "neg_entropy")
"""How a teacher's confidence at a token is measured for MAD-OPD's weights (`teacher_confidence`)."""


def teacher_confidence(teacher_logits: Tensor, sampled_ids: Tensor, kind: str = "sampled_logp") -> Tensor:
    """MAD-OPD's confidence c_m,t of each of M teachers at each of N tokens, (M, N), from their logits (M, N, V):

        "sampled_logp":  c_m,t = log p_m(y_t | ...), the teacher's log-prob of the student's sampled token y_t
                         (`sampled_ids`, (N,));
        "neg_entropy":   c_m,t = -H(p_m,t) = sum_v p_m,t(v) log p_m,t(v), how peaked the teacher is, whatever y_t.

    No gradient (teachers are frozen)."""
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    if kind == "sampled_logp":
        index = sampled_ids.reshape(1, -1, 1).expand(log_p.size(0), -1, 1)
        return log_p.gather(-1, index).squeeze(-1)
    if kind == "neg_entropy":
        return (log_p.exp() * log_p).sum(-1)
    raise ValueError(f"unknown MAD-OPD confidence {kind!r}; the known ones are {', '.join(MAD_CONFIDENCES)}")


def mad_opd_weights(confidence: Tensor, temperature: float = 1.0) -> Tensor:
    """MAD-OPD's per-token teacher weights, (M, N): a_m,t = softmax over the M teachers of c_m,t / temperature.

    Reconstruction (the specification names MAD-OPD, "debating teachers", only; no formula is published with it):
    the debate is read as per-token arbitration by confidence. With c = log p_m(y_t) and temperature 1,
    a_m,t = p_m(y_t) / sum_n p_n(y_t): each teacher weighs by the probability it gives the sampled token. A large
    temperature tends to the uniform average 1 / M; a temperature near 0 to the single most confident teacher."""
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"the MAD-OPD temperature must be a finite number > 0, got {temperature}")
    return torch.softmax(confidence.detach().float() / temperature, dim=0)


def mad_opd_token_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    *,
    confidence: str = "sampled_logp",
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """MAD-OPD's distillation term per token, reconstructed (see `mad_opd_weights`):

        L_t = sum_m a_m,t * D(p_m,t, p_S,t),   a_m,t = softmax_m(c_m,t / temperature)   (stop-gradient on a)

    with D any per-token loss of this module (`loss_fn`, e.g. `generalized_jsd`), the student's logits (N, V) (with
    gradient), the M teachers' logits (M, N, V) and the sampled tokens (N,). Returns (L (N,), a (M, N))."""
    weights = mad_opd_weights(teacher_confidence(teacher_logits, sampled_ids, confidence), temperature)
    per_teacher = torch.stack([_token_loss(loss_fn, student_logits, logits, sampled_ids) for logits in teacher_logits])
    return (weights * per_teacher).sum(0), weights


def selected_mad_opd_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    student_hidden: Tensor,
    teacher_hiddens: list[Tensor],
    selected: Tensor,
    heads: tuple[nn.Module, list[nn.Module]],
    temperature: float,
    sampled_ids: Tensor,
    *,
    confidence: str = "sampled_logp",
    mad_temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """`mad_opd_token_loss` at the `selected` (B, T) positions of the student's (B, T, H) hidden states and each of
    the M teachers' (`teacher_hiddens`), through the (student head, teacher heads) `heads`, with the sampled tokens
    `sampled_ids` (B, T): the per-token loss (N,) and the teachers' weights (M, N). As `selected_token_loss`: heads
    gathered once, `chunk_tokens` positions projected at a time, each chunk recomputed in the backward pass."""
    student = head_logits(heads[0], temperature)
    teachers = [head_logits(head, temperature, grad=False) for head in heads[1]]
    if not selected.any():
        empty = student_hidden.new_zeros(len(teachers), 0, dtype=torch.float32)
        return (student_hidden.sum() * 0.0 + student.zero()).expand(0), empty
    flat_s, ids = student_hidden[selected], sampled_ids[selected]
    flat_t = [hidden[selected] for hidden in teacher_hiddens]
    weights: dict[int, Tensor] = {}

    def piece(hidden_s: Tensor, chunk_ids: Tensor, index: int, *hidden_t: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = torch.stack([head(h) for head, h in zip(teachers, hidden_t, strict=True)])
        loss, chunk_weights = mad_opd_token_loss(
            loss_fn, student(hidden_s), teacher_logits, chunk_ids, confidence=confidence, temperature=mad_temperature
        )
        weights.setdefault(index, chunk_weights)
        return loss

    recompute = torch.is_grad_enabled() and flat_s.requires_grad
    pieces = []
    for index, start in enumerate(range(0, flat_s.size(0), chunk_tokens)):
        end = start + chunk_tokens
        args = (flat_s[start:end], ids[start:end], index, *[hidden[start:end] for hidden in flat_t])
        pieces.append(checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args))
    return torch.cat(pieces), torch.cat([weights[i] for i in sorted(weights)], dim=1)
