"""Off-policy MSD (Multilingual Self-Distillation, arXiv 2605.02971) as a teacher-rollout term
(`teacher_rollout_loss="msd"`): the teacher writes the completions, from its teacher prompt (the parallel prompt with
`privileged_source="parallel"`), and the student is distilled on them after its own prompt. On-policy MSD, on the
student's own completions, is the distillation loss `distill_loss="msd"` (`rlsd.core.family_losses`).

Registered on `rlsd.step.rollout_term`'s machinery as it is (`@loss_term`, `TeacherRollouts`); the math is
`rlsd.core.family_losses.msd_topk_token_loss`. Imported by `rlsd.config`, which registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlsd.core.family_losses import msd_topk_token_loss
from rlsd.core.rollout_losses import chunked_rows
from rlsd.infra.guards import check_plain_lm_head
from rlsd.infra.validate import ConfigError
from rlsd.step.rollout_term import LossTerm, TeacherRollouts, TeacherSamples, TermRows, TermValue, loss_term


def chunked_msd_topk_loss(
    hidden: Tensor,
    logits_fn: Callable[[Tensor], Tensor],
    teacher_topk_logps: Tensor,
    teacher_topk_ids: Tensor,
    sampled_ids: Tensor,
    chunk_tokens: int = 1024,
) -> Tensor:
    """`msd_topk_token_loss` at N tokens from the student's hidden states (N, H) through `logits_fn` (its LM head),
    `chunk_tokens` positions at a time, each chunk recomputed in the backward pass (no (N, V) tensor is held).
    Returns (N,)."""

    def piece(h: Tensor, logps: Tensor, ids: Tensor, sampled: Tensor) -> Tensor:
        return msd_topk_token_loss(logits_fn(h), logps, ids, sampled)

    return chunked_rows(piece, hidden, teacher_topk_logps, teacher_topk_ids, sampled_ids, chunk_tokens=chunk_tokens)


@loss_term("msd")
class OffPolicyMSD(LossTerm):
    """Off-policy MSD: the teacher samples N = `teacher_rollouts` completions of each prompt from its teacher prompt,
    the completion at position j < N of a group is paired with sample j (each sample is learned from once), and the
    term is the token mean over the samples' tokens of DPSW-weighted reverse KL (`msd_topk_token_loss`): the student
    teacher-forced on the sample after its own prompt, the teacher's distribution kept as its top K = `msd_topk`
    log-probs (the tail as one more bucket) from one no-grad pass when it sampled, the weight (1 - H(p_T^K) / log K)
    * (1 - p_S(y_t)) on the teacher's token y_t. Costs per step one teacher
    generation of N per prompt, one no-grad teacher forward on the samples and one more student forward with
    gradient per micro-batch on them. Needs N <= num_generations and a policy whose logits are a plain head's."""

    def __init__(self, rollouts: TeacherRollouts) -> None:
        self.rollouts = rollouts

    @classmethod
    def check_config(cls, args: Any) -> None:
        """Completion j of a group learns sample j: more samples than completions would go unused."""
        if args.teacher_rollouts > args.num_generations:
            raise ConfigError("--teacher_rollouts", f"is {args.teacher_rollouts} with teacher_rollout_loss='msd' and "
                              f"num_generations={args.num_generations}", "each completion of a group carries one "
                              "teacher sample: pass at most num_generations")  # fmt: skip

    @classmethod
    def check_supported(cls, args: Any, policy: torch.nn.Module, datasets: dict[str, Any]) -> None:
        """The loss projects hidden states through a plain head: a `policy` that caps or rescales its logits is
        refused."""
        check_plain_lm_head(policy, "teacher_rollout_loss='msd'")

    def add(self, samples: TeacherSamples, pass_logps: Tensor | None) -> TermRows:
        """Each row's paired teacher sample (`ids`, `mask`: zero on rows at group position >= N) and the teacher's
        top-K log-probs and ids on it (`topk_logps`, `topk_ids`)."""
        s, n, k = samples, samples.n, self.rollouts.args.msd_topk
        device = s.teacher_ids.device
        per_sample = (s.teacher_ids.repeat_interleave(n, dim=0), s.teacher_mask.repeat_interleave(n, dim=0))
        _, topk_logps, topk_ids = self.rollouts.trajectory_pass("teacher", *per_sample, s.ids, s.mask, k)
        position = s.positions.to(device) % s.group_size
        pick = s.row_prompt.to(device) * n + position % n
        keep = (position < n).long()
        values = {"ids": s.ids[pick], "mask": s.mask[pick] * keep[:, None], "topk_logps": topk_logps[pick],
                  "topk_ids": topk_ids[pick]}  # fmt: skip
        return TermRows(values, {})

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], values: dict[str, Tensor], student_logps: Tensor
    ) -> TermValue:
        """The token mean over the micro-batch's teacher samples: one forward of the student's backbone on [plain
        prompt ; sample], with gradient, on the rows that carry one, its hidden states projected `distill_chunk_tokens`
        at a time."""
        rollouts = self.rollouts
        rows = values["mask"].any(dim=1).nonzero().flatten()
        if rows.numel() == 0:  # no teacher sample in this micro-batch
            return TermValue(0.0, 0.0, {})
        ids, selected, states, logits_fn = rollouts.student_states(model, inputs, values, rows)
        top_logps, top_ids = values["topk_logps"][rows][selected], values["topk_ids"][rows][selected]
        per_token = chunked_msd_topk_loss(states[selected], logits_fn, top_logps, top_ids, ids[selected],
                                          rollouts.args.distill_chunk_tokens)  # fmt: skip
        count = selected.sum()
        return TermValue(per_token.sum() / count.clamp(min=1), count.item(), {})
