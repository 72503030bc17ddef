"""Distillation losses of the self-distillation family beyond the project's own (`@distill_loss`, each one function
with its knobs): registered when `rlsd.core` is imported. The shared kernels and the registry are in
`rlsd.core.distill`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlsd.core.distill import (
    Knob,
    SampledTokenLoss,
    TokenLoss,
    _boolean,
    _positive_integer,
    _unit_interval,
    _with_tail,
    distill_loss,
    generalized_jsd,
    selected_token_loss,
)


@dataclass(frozen=True)
class SampledLogitsLoss(SampledTokenLoss):
    """A per-token loss over the full next-token distributions that also reads the sampled tokens: `fn(student_logits
    (..., V) with gradient, teacher_logits (..., V) detached, sampled_ids (...)) -> (...)`. A `SampledTokenLoss`, so
    the kernels hand it the sampled ids of the same positions; unlike its base it sees the whole logits."""

    fn: Callable[[Tensor, Tensor, Tensor], Tensor]

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor | None = None) -> Tensor:
        if sampled_ids is None:
            raise ValueError("this distillation loss reads the sampled tokens: pass their ids (sampled_ids)")
        return self.fn(student_logits, teacher_logits.detach(), sampled_ids)


# -------------------------------------------------------------------------------------------------------- MSD
def topk_confidence(log_probs: Tensor, k: int) -> Tensor:
    """1 - H(q) / log K, q the distribution renormalized over its K most likely tokens (K capped at V): 1 when one
    token holds all of the top-K mass, 0 when the K are equally likely; 1 for K = 1. No gradient. (...)."""
    k = min(k, log_probs.size(-1))
    if k < 2:
        return torch.ones_like(log_probs[..., 0])
    top = log_probs.detach().topk(k, dim=-1).values.log_softmax(-1)
    entropy = -(top.exp() * top).sum(-1)
    return (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)


def dpsw_weights(student_log_probs: Tensor, teacher_log_probs: Tensor, sampled_ids: Tensor, k: int) -> Tensor:
    """MSD's Dual-Perspective Safety Weighting per token, as reconstructed here (arXiv 2605.02971 publishes the
    product, not its factors' exact form; README, "MSD"): w_t = w_t^T * w_t^S, no gradient, with

        w_t^T = 1 - H(p_T^K) / log K      the teacher's confidence: its top-K entropy, normalized (high where the
                                          teacher is sure what comes next: a safety-critical token)
        w_t^S = 1 - p_S(y_t)              the student's disagreement risk on the token it is trained on, y_t

    from the log-probs (..., V) of both and the tokens y_t (...). Each factor and w_t lie in [0, 1]."""
    student_sampled = student_log_probs.detach().gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1).exp()
    return topk_confidence(teacher_log_probs, k) * (1.0 - student_sampled)


def msd_token_loss(student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor, k: int = 20) -> Tensor:
    """MSD's per-token loss: the reverse KL over the full vocabulary weighted by DPSW (`dpsw_weights`),

        L_t = sg(w_t) * KL(p_S,t || p_T,t) = sg(w_t) * sum_v p_S(v) (log p_S(v) - log p_T(v)),

    on the student's logits (with gradient), the teacher's (detached) and the tokens y_t the weights read (the
    student's own samples on-policy). The caller takes the token mean."""
    log_s = F.log_softmax(student_logits, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach(), dim=-1)
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return dpsw_weights(log_s, log_t, sampled_ids, k) * reverse_kl


def msd_topk_token_loss(
    student_logits: Tensor, teacher_topk_logps: Tensor, teacher_topk_ids: Tensor, sampled_ids: Tensor
) -> Tensor:
    """Off-policy MSD's per-token loss on a teacher's trajectory, from the teacher's top-K log-probs and ids (..., K)
    stored when it sampled (no gradient) instead of its whole distribution: `msd_token_loss` with both distributions
    coarsened to K + 1 buckets, the teacher's top K and the rest (the tail bucket of `topk_jsd`),

        L_t = sg(w_t) * sum_b s_b (log s_b - log q_b),   s = (p_S(top_k), 1 - sum_k p_S(top_k)), q likewise for p_T

    (a lower bound of the full reverse KL, equal to it when the teacher's K hold all its mass), with the DPSW weight
    w_t = (1 - H(p_T^K) / log K) * (1 - p_S(y_t)) of the teacher's own token y_t (`sampled_ids`): the student's
    disagreement with what the teacher wrote. The student's logits (..., V) carry the gradient."""
    log_s_full = F.log_softmax(student_logits, dim=-1)
    log_t = _with_tail(teacher_topk_logps.detach())
    log_s = _with_tail(log_s_full.gather(-1, teacher_topk_ids))
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    student_sampled = log_s_full.detach().gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1).exp()
    weight = topk_confidence(teacher_topk_logps, teacher_topk_logps.size(-1)) * (1.0 - student_sampled)
    return weight * reverse_kl


@distill_loss(
    "msd",
    knobs={
        "msd_topk": Knob(
            20, "K of distill_loss='msd' (and teacher_rollout_loss='msd'): the teacher's confidence weight is 1 - its "
            "entropy over its K most likely tokens / log K (the project's K; the paper's is not published).",
            _positive_integer,
        ),
    },
)  # fmt: skip
def _msd(msd_topk: int) -> TokenLoss:
    """MSD (Multilingual Self-Distillation, arXiv 2605.02971), on-policy: the reverse KL(p_S || p_T) over the full
    vocabulary on the student's own completions, each token weighted by DPSW, sg((1 - H_K(p_T) / log K) * (1 -
    p_S(y_t))) (`msd_token_loss`, a reconstruction of the weights); the teacher is shown the parallel prompt
    (privileged_source='parallel')."""
    return SampledLogitsLoss(functools.partial(msd_token_loss, k=msd_topk))


# ------------------------------------------------------------------------------------------------------- RESD
def resd_topk_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, k: int = 100, floor: float = 0.2, tail: bool = True
) -> Tensor:
    """RESD's per-token loss (Reflection-Enhanced Self-Distillation, arXiv 2605.12741; its code, horizon-llm/RESD,
    `compute_self_distillation_loss` with alpha = 1 (reverse KL), distillation_topk = k, the student's top-k as the
    support, a tail bucket and teacher_prob_min_ratio = floor): with S the student's k most likely tokens (no
    gradient through the choice) and p~ a distribution restricted to S plus, with `tail`, one bucket holding the
    rest of its mass (without it, renormalized over S),

        log q_T(v) = max(log p~_T(v), sg(log p~_S(v)) + log floor)      the clipped ratio: q_T(v) / p~_S(v) >= floor
        L_t = sum_v p~_S(v) (log p~_S(v) - log q_T(v))                    reverse KL(p~_S || q_T), v in S (+ tail)

    on the student's logits (with gradient) and the teacher's (detached); floor = 0 leaves the teacher unclipped. The
    clip bounds how hard a token the teacher nearly rules out is pushed down (log p~_S - log q_T <= -log floor). The
    caller takes the token mean."""
    k = min(k, student_logits.size(-1))
    log_student = F.log_softmax(student_logits, dim=-1)
    top = log_student.detach().topk(k, dim=-1).indices
    log_s = log_student.gather(-1, top)
    log_t = F.log_softmax(teacher_logits.detach(), dim=-1).gather(-1, top)
    if tail:
        log_s, log_t = _with_tail(log_s), _with_tail(log_t)
    else:
        log_s, log_t = log_s.log_softmax(-1), log_t.log_softmax(-1)
    if floor > 0.0:
        log_t = torch.maximum(log_t, log_s.detach() + math.log(floor))
    return (log_s.exp() * (log_s - log_t)).sum(-1)


@distill_loss(
    "resd_topk",
    knobs={
        "resd_topk": Knob(
            100, "k of distill_loss='resd_topk': the reverse KL is taken over the student's k most likely tokens "
            "(RESD's distillation_topk).", _positive_integer,
        ),
        "resd_teacher_floor": Knob(
            0.2, "With distill_loss='resd_topk', the teacher's probability of each token of the support is clipped "
            "from below at this fraction of the student's (RESD's teacher_prob_min_ratio); 0 turns the clip off.",
            _unit_interval,
        ),
        "resd_tail": Knob(
            True, "With distill_loss='resd_topk', the mass outside the student's top-k forms one extra bucket "
            "(RESD's distillation_add_tail); without it both distributions are renormalized over the top-k.",
            _boolean,
        ),
    },
)  # fmt: skip
def _resd_topk(resd_topk: int, resd_teacher_floor: float, resd_tail: bool) -> TokenLoss:
    """RESD (arXiv 2605.12741): the reverse KL(p_S || p_T) over the student's top `resd_topk` tokens plus a tail
    bucket (`resd_tail`), the teacher's probabilities clipped from below at `resd_teacher_floor` times the student's
    (`resd_topk_reverse_kl`, as RESD's code computes it); the teacher is shown the playbook and the row's reflection
    (privileged_source='reflection'), whose batch-success weights weigh each row."""
    return functools.partial(resd_topk_reverse_kl, k=resd_topk, floor=resd_teacher_floor, tail=resd_tail)


# ------------------------------------------------------------------------------------------------------ TRACE
@dataclass(frozen=True)
class RoutedTokenLoss:
    """A distillation loss that routes each completion token by its label (`RLSDEntries.distill_labels`, from a
    source that gives `Context.char_spans`): the tokens labelled `label` get `routes[label]`, every other token none.
    Its weight in the term is scaled per optimizer step by `scale(step)`: 1 for the first `warmup_steps`, then down
    linearly to 0 over `decay_steps` (0: no decay), applied to each row's weight when the rollout is scored. The tokens
    a route takes leave the policy gradient while the weight is above 0 (`policy_mask`), unless `policy_on_routes`."""

    routes: dict[int, TokenLoss]
    warmup_steps: int = 0
    decay_steps: int = 0
    policy_on_routes: bool = False

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, *rest: Any) -> Tensor:
        raise ValueError(
            "this distillation loss routes tokens by their labels, which only the distillation term reads "
            "(`routed_token_loss`): it cannot be used without them (MAD-OPD's teachers, a teacher-rollout loss)"
        )

    def scale(self, step: int) -> float:
        """The weight of the term at optimizer step `step` (1-based)."""
        if self.decay_steps <= 0 or step <= self.warmup_steps:
            return 1.0
        return max(0.0, 1.0 - (step - self.warmup_steps) / self.decay_steps)

    def policy_mask(self, labels: Tensor, step: int) -> Tensor:
        """(B, T) float, the tokens the policy gradient runs on at optimizer step `step`: 0 on those a route takes
        (`labels` (B, T)) while the distillation weight is above 0, 1 on every other token; all 1 with
        `policy_on_routes`, and once the weight has fallen to 0 (the KL channel annealed away leaves GRPO)."""
        if self.policy_on_routes or self.scale(step) <= 0.0:
            return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
        routes = torch.tensor(list(self.routes), dtype=labels.dtype, device=labels.device)
        return (~torch.isin(labels, routes)).float()


def routed_token_loss(
    loss: RoutedTokenLoss,
    labels: Tensor,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    selected: Tensor,
    heads: tuple[torch.nn.Module, torch.nn.Module],
    temperature: float,
    chunk_tokens: int = 1024,
    sampled_ids: Tensor | None = None,
) -> Tensor:
    """The per-token loss (N,) at the `selected` (B, T) positions, each token's through the route of its label
    (`labels` (B, T)): one `selected_token_loss` per route on the tokens it takes (every route runs on every process,
    also with no token, so that sharded heads gather alike), 0 on a selected token no route takes."""
    flat = labels[selected]
    per_token = student_hidden.new_zeros(flat.shape, dtype=torch.float32)
    for label, fn in loss.routes.items():
        part = selected_token_loss(
            fn, student_hidden, teacher_hidden, selected & (labels == label), heads, temperature,
            chunk_tokens=chunk_tokens, sampled_ids=sampled_ids,
        )  # fmt: skip
        per_token = per_token.masked_scatter(flat == label, part.float())
    return per_token


def _non_negative_integer(value: Any) -> str | None:
    """An integer >= 0 (a bool is not one here)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    return None if integer and value >= 0 else f"must be an integer >= 0, got {value!r}"


@distill_loss(
    "trace",
    knobs={
        "trace_key_kl": Knob(
            True, "With distill_loss='trace', the forward KL(p_T || p_S) on the key spans of correct completions "
            "(label +1; the paper's best routed action on Qwen3-8B).", _boolean,
        ),
        "trace_error_kl": Knob(
            False, "With distill_loss='trace', the reverse KL(p_S || p_T) on the error spans of wrong completions "
            "(label -1; the paper's optional channel, its best on Qwen3-1.7B).", _boolean,
        ),
        "trace_kl_warmup_steps": Knob(
            20, "With distill_loss='trace', the optimizer steps at full KL weight before it decays (a reconstruction: "
            "the paper anneals the KL channel away 'after a short warm-up').", _non_negative_integer,
        ),
        "trace_kl_decay_steps": Knob(
            30, "With distill_loss='trace', the optimizer steps over which the KL weight then falls linearly to 0 "
            "(a reconstruction); 0 keeps it at full weight for the whole run.", _non_negative_integer,
        ),
        "trace_grpo_on_spans": Knob(
            False, "With distill_loss='trace', the policy gradient also runs on the tokens the KL routes take; off "
            "(the paper's 'GRPO elsewhere'), they leave it while the KL weight is above 0.", _boolean,
        ),
    },
)  # fmt: skip
def _trace(
    trace_key_kl: bool,
    trace_error_kl: bool,
    trace_kl_warmup_steps: int,
    trace_kl_decay_steps: int,
    trace_grpo_on_spans: bool,
) -> TokenLoss:
    """TRACE (arXiv 2605.10194): forward KL(p_T || p_S) over the full vocabulary on the tokens of key spans (label +1)
    and, with `trace_error_kl`, reverse KL(p_S || p_T) on those of error spans (label -1), 0 on every other token
    (left to the policy gradient, which leaves the routed tokens unless `trace_grpo_on_spans`); the weight is 1 for
    `trace_kl_warmup_steps` then decays linearly to 0 over `trace_kl_decay_steps`. The spans come from an annotator
    (privileged_source='annotation')."""
    routes: dict[int, TokenLoss] = {}
    if trace_key_kl:
        routes[1] = functools.partial(generalized_jsd, beta=0.0)
    if trace_error_kl:
        routes[-1] = functools.partial(generalized_jsd, beta=1.0)
    return RoutedTokenLoss(routes, trace_kl_warmup_steps, trace_kl_decay_steps, trace_grpo_on_spans)
