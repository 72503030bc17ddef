"""Teacher rollouts: the teacher *generates* completions, and two losses learn from them (pure torch, no TRL).

BRTS (best-of-N rollout teacher selection) and PBSD (preference-based self-distillation) are reconstructions from
their one-paragraph descriptions (issue 14); the trainer (`rlsd.trainer`) generates, scores and batches, this module
holds the math:

- `select_rollout` / `select_brts`: BRTS's choice of one of the N teacher trajectories of a prompt (best reward
  first, then the student-aligned one), with the answer-shown retry when none of the N is correct (`Candidates`:
  the N, or 2N, trajectories of each prompt);
- `topk_trajectory_kl` / `chunked_topk_kl`: BRTS's loss, KL(p_T^K || p_S^K) over the teacher's top-K tokens at each
  token of the selected trajectory, both distributions renormalized over those K;
- `pbsd_loss`: PBSD's DPO-style loss between a teacher sample (positive) and a student sample (negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


# ------------------------------------------------------------------------------------------------ generation
def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """(R, L) mask of the generated tokens up to and including the first EOS (TRL's rule for its own rollouts)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    first = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=completion_ids.device)
    found = is_eos.any(dim=1)
    first[found] = is_eos.int().argmax(dim=1)[found]
    positions = torch.arange(is_eos.size(1), device=completion_ids.device).expand(is_eos.size(0), -1)
    return (positions <= first.unsqueeze(1)).long()


def pair_index(group_positions: Tensor, n: int) -> Tensor:
    """PBSD's pairing: student completion j of a group (its position in the group) gets teacher sample j mod N."""
    return group_positions.remainder(n)


# ------------------------------------------------------------------------------------------------- selection
def teacher_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's top-k log-probs and token ids at each position, ((..., k), (..., k)), k capped at V; no grad."""
    logps = F.log_softmax(logits.detach().float(), dim=-1)
    top = logps.topk(min(k, logps.size(-1)), dim=-1)
    return top.values, top.indices


def trajectory_alignment(student_topk_ids: Tensor, teacher_topk_ids: Tensor, mask: Tensor) -> Tensor:
    """How student-aligned each trajectory is, (R,): the mean over its tokens (`mask`, (R, L)) of
    |TopK(p_S) & TopK(p_T)| / K (Rethinking-OPD's overlap, as `rlsd.core.distill.topk_overlap`) from the two models'
    top-K token ids (R, L, K); 0 for an empty trajectory."""
    shared = (student_topk_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)).any(-1).sum(-1)
    overlap = shared.float() / teacher_topk_ids.size(-1) * mask
    return overlap.sum(-1) / mask.sum(-1).clamp(min=1)


def select_rollout(rewards: Tensor, alignment: Tensor) -> tuple[Tensor, Tensor]:
    """BRTS's choice among the N trajectories of each of P prompts, from their total rewards and alignments (P, N):

        best_p   = max_j r_pj                      (NaN, an abstaining reward, counts as -inf)
        choice_p = argmax_{j : r_pj = best_p} a_pj (the first on ties)
        correct_p = best_p > 0

    With 0/1 rewards this is "a correct trajectory first, then the most aligned"; with graded rewards the best
    rewarded first. Returns (choice (P,) long, correct (P,) bool)."""
    rewards = torch.nan_to_num(rewards.float(), nan=-torch.inf)
    best = rewards.max(dim=-1, keepdim=True).values
    score = torch.where(rewards == best, alignment.float(), torch.full_like(alignment.float(), -torch.inf))
    # all-NaN rows: every trajectory ties at -inf and the most aligned wins
    return score.argmax(dim=-1), best.squeeze(-1) > 0


class BRTSChoice(NamedTuple):
    """BRTS's choice per prompt: `index` into the 2N candidates (the first N, then the N of the answer-shown retry),
    whether the chosen one is correct, and whether the prompt needed the retry."""

    index: Tensor  # (P,) long in [0, 2N)
    correct: Tensor  # (P,) bool
    retried: Tensor  # (P,) bool


def select_brts(
    rewards: Tensor, alignment: Tensor, retry_rewards: Tensor | None = None, retry_alignment: Tensor | None = None
) -> BRTSChoice:
    """BRTS with its retry, (P, N) each: a prompt with a correct first trajectory takes `select_rollout` of the first
    N; else of the retry's N (shown the reference answer; index N + j) when one of them is correct; else the most
    aligned of all 2N (recorded as not correct, never dropped). Without a retry (None), a prompt with no correct
    trajectory takes the most aligned of its N."""
    first, first_ok = select_rollout(rewards, alignment)
    n = rewards.size(-1)
    if retry_rewards is None or retry_alignment is None:
        fallback = alignment.float().argmax(dim=-1)
        return BRTSChoice(torch.where(first_ok, first, fallback), first_ok, torch.zeros_like(first_ok))
    second, second_ok = select_rollout(retry_rewards, retry_alignment)
    most_aligned = torch.cat([alignment, retry_alignment], dim=-1).float().argmax(dim=-1)
    index = torch.where(first_ok, first, torch.where(second_ok, n + second, most_aligned))
    return BRTSChoice(index, first_ok | second_ok, ~first_ok)


class Candidates(NamedTuple):
    """BRTS's N teacher trajectories of each of P prompts: ids and mask (P, N, L), weighted total rewards and
    alignments (P, N), the teacher's top-K log-probs and ids on them ((P, N, L, K) each)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    alignment: torch.Tensor
    topk: tuple[torch.Tensor, torch.Tensor]

    def spread(self, order: torch.Tensor, count: int) -> Candidates:
        """Those of prompts `order` placed at their rows among `count` prompts; the other prompts get NaN rewards,
        -inf alignment and empty trajectories (they are never selected: they had a correct first trajectory)."""

        def place(value: torch.Tensor, fill: float) -> torch.Tensor:
            out = value.new_full((count, *value.shape[1:]), fill)
            out[order] = value
            return out

        topk = (place(self.topk[0], 0.0), place(self.topk[1], 0))
        return Candidates(place(self.ids, 0), place(self.mask, 0), place(self.rewards, math.nan),
                          place(self.alignment, -math.inf), topk)  # fmt: skip

    def join(self, other: Candidates) -> Candidates:
        """The 2N candidates of each prompt, these first, trajectories right-padded to a common length."""
        length = max(self.ids.size(2), other.ids.size(2))

        def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a, b = (F.pad(x, (0, 0) * (x.dim() - 3) + (0, length - x.size(2))) for x in (a, b))
            return torch.cat([a, b], dim=1)

        return Candidates(both(self.ids, other.ids), both(self.mask, other.mask),
                          torch.cat([self.rewards, other.rewards], dim=1),
                          torch.cat([self.alignment, other.alignment], dim=1),
                          (both(self.topk[0], other.topk[0]), both(self.topk[1], other.topk[1])))  # fmt: skip


# ---------------------------------------------------------------------------------------------- BRTS's loss
def topk_trajectory_kl(student_logits: Tensor, teacher_topk_logps: Tensor, teacher_topk_ids: Tensor) -> Tensor:
    """BRTS's per-token loss on the teacher's trajectory: KL(p_T^K || p_S^K) over the teacher's top-K tokens, both
    renormalized over those K (no tail bucket: only the shape of the distribution inside the teacher's top K is
    matched, the student's mass outside it is not pulled towards the teacher's tail):

        q_k = softmax(log p_T(top_k)),  s_k = softmax(z_S[top_k])   (= p_S(top_k) / sum_K p_S)
        L   = sum_k q_k (log q_k - log s_k)

    with z_S the student's logits (..., V) (with gradient; dL/dz_S[top_k] = s_k - q_k, 0 off the top K), and the
    teacher's top-K log-probs and ids (..., K) (no gradient). Returns (...)."""
    log_q = teacher_topk_logps.detach().float().log_softmax(-1)
    log_s = student_logits.float().gather(-1, teacher_topk_ids).log_softmax(-1)
    return (log_q.exp() * (log_q - log_s)).sum(-1)


def chunked_topk_kl(
    hidden: Tensor,
    logits_fn: Callable[[Tensor], Tensor],
    teacher_topk_logps: Tensor,
    teacher_topk_ids: Tensor,
    chunk_tokens: int = 1024,
) -> Tensor:
    """`topk_trajectory_kl` at N tokens from the student's hidden states (N, H) through `logits_fn` (its LM head),
    `chunk_tokens` positions at a time, each chunk recomputed in the backward pass (no (N, V) tensor is held).
    Returns (N,)."""

    def piece(h: Tensor, logps: Tensor, ids: Tensor) -> Tensor:
        return topk_trajectory_kl(logits_fn(h), logps, ids)

    return chunked_rows(piece, hidden, teacher_topk_logps, teacher_topk_ids, chunk_tokens=chunk_tokens)


def chunked_sampled_logps(
    hidden: Tensor, logits_fn: Callable[[Tensor], Tensor], ids: Tensor, chunk_tokens: int = 1024
) -> Tensor:
    """log p(ids) at N tokens from hidden states (N, H) through `logits_fn`, `chunk_tokens` at a time, each chunk
    recomputed in the backward pass. Returns (N,)."""

    def piece(h: Tensor, chunk_ids: Tensor) -> Tensor:
        return F.log_softmax(logits_fn(h), dim=-1).gather(-1, chunk_ids.unsqueeze(-1)).squeeze(-1)

    return chunked_rows(piece, hidden, ids, chunk_tokens=chunk_tokens)


def chunked_rows(piece: Callable[..., Tensor], hidden: Tensor, *rows: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """`piece(hidden, *rows)` over the N positions `chunk_tokens` at a time (the first dimension of `hidden` (N, H)
    and of each of `rows`), each chunk recomputed in the backward pass when `hidden` needs a gradient (no (N, V)
    logits are held). Returns (N,)."""
    if hidden.size(0) == 0:
        return hidden.sum(-1) * 0.0
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, hidden.size(0), chunk_tokens):
        args = (hidden[start : start + chunk_tokens], *(row[start : start + chunk_tokens] for row in rows))
        pieces.append(checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args))
    return torch.cat(pieces)


# ---------------------------------------------------------------------------------------------- PBSD's loss
def pbsd_loss(
    policy_pos: Tensor, ref_pos: Tensor, policy_neg: Tensor, ref_neg: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """PBSD's DPO-style loss per pair, with the teacher's sample y+ as the chosen and the student's y- as the rejected
    response, sequence log-probs (R,) of the student (with gradient, on the plain prompt x) and of the teacher (no
    gradient, on its teacher prompt x_T):

        m = beta * [(log pi(y+|x) - log pi_T(y+|x_T)) - (log pi(y-|x) - log pi_T(y-|x_T))]
        L = -log sigmoid(m)        (dL/d log pi(y+|x) = -beta * sigmoid(-m))

    Returns (L (R,), m (R,))."""
    margin = beta * ((policy_pos - ref_pos.detach()) - (policy_neg - ref_neg.detach()))
    return -F.logsigmoid(margin), margin


def distinct_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The first index of each distinct row of `rows` (R, L) and, for every row, the position of its distinct row in
    that list: `rows[first][inverse]` equals `rows`, so work done once per distinct row is spread back by `inverse`."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(rows.size(0), device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), rows.size(0), device=rows.device, dtype=order.dtype)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first, inverse
