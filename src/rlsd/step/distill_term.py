"""`DistillationTerm`: the loss-time distillation term of `RLSDTrainer` (`distill_loss`), MAD-OPD's weighted sum of
teachers (`mad_opd_teachers`) and SDPG's reference anchor (`sdpg_ref_coef`), with their `rlsd/` metrics. The kernels
(chunked losses, heads, MAD-OPD weights, the overlap probe) are in `rlsd.core.distill`; this term turns them into one
micro-batch's loss. It receives values and callables, never the trainer, and reads what travelled from the rollout
through `RLSDEntries` (`distill_weight`, `ref_logps`), never raw `rlsd_*` keys."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlsd.config import RLSDConfig
from rlsd.core.credit import TokenMean
from rlsd.core.distill import OverlapProbe, sdpg_ref_penalty, selected_mad_opd_loss, selected_token_loss
from rlsd.core.family_losses import RoutedTokenLoss, routed_token_loss
from rlsd.core.gui_sd import TextWeightedLoss
from rlsd.plan import StepPlan
from rlsd.step.batch import RLSDEntries, loss_mask, token_pieces

Hidden = tuple[torch.Tensor, torch.nn.Module]
"""Hidden states at the completion positions (B, T, H) and the LM head that projects them."""


@dataclass(frozen=True, kw_only=True)
class DistillationTerm:
    """distill_coef * the distillation loss's token mean (+ SDPG's anchor) of a micro-batch, scaled for gradient
    accumulation. Built once by the trainer; the loss and its coefficient come from the active stage's plan."""

    args: RLSDConfig  # the fields no stage sets: `distill_overlap_k`, `distill_chunk_tokens`, MAD, SDPG
    temperature: float  # divides the logits of both heads, as in every scoring forward
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    training: Callable[[], bool]  # whether the policy is in training mode
    accumulation: Callable[[], int]  # HF's `current_gradient_accumulation_steps`
    decode_tokens: Callable[[Any], list[str]] | None = None  # the tokenizer's `batch_decode`, for `TextWeightedLoss`

    def rollout_entries(
        self,
        plan: StepPlan,
        entries: RLSDEntries,
        teacher: Any,
        seq_advantages: Tensor,
        row_weights: Tensor | None = None,
        token_labels: Tensor | None = None,
        step: int = 1,
        mode: str = "train",
    ) -> None:
        """What the loss-time term needs from the rollout into `entries`: the teacher's prompt (ids, mask, token
        types of `teacher`, a `TeacherInputs`) and each row's weight (1 with privileged context, 0 without; with
        `distill_positive_only`, 0 on rows whose A_i <= 0), times the source's own `row_weights` when it gives them
        (`Context.row_weights`, RESD's batch-success weights). A loss that routes tokens by label
        (`RoutedTokenLoss`, TRACE) also gets the source's `token_labels` (B, T) (refused without them), its weight at
        optimizer step `step` (`RoutedTokenLoss.scale`, logged as `rlsd/distill_scale`) scales every row's, and the
        tokens it leaves to the policy gradient (`RoutedTokenLoss.policy_mask`) go to `entries.policy_mask`."""
        entries.teacher_prompt_ids, entries.teacher_prompt_mask = teacher.prompt_ids, teacher.prompt_mask
        entries.teacher_types = teacher.token_types
        weight = entries.has_context.float()
        if plan.distill_positive_only:
            weight = weight * (seq_advantages > 0).float()
        if row_weights is not None:
            weight = weight * row_weights.to(weight)
        if isinstance(plan.distill_fn, RoutedTokenLoss):
            if token_labels is None:
                raise ValueError(
                    f"distill_loss={plan.distill_loss!r} routes tokens by the labels of an annotating source, which "
                    "this privileged_source does not give: use privileged_source='annotation'"
                )
            entries.distill_labels = token_labels
            entries.policy_mask = plan.distill_fn.policy_mask(token_labels, step)
            scale = plan.distill_fn.scale(step)
            weight = weight * scale
            self.log(mode, {"distill_scale": TokenMean(scale, 1)})
        entries.distill_weight = weight

    def text_weights(self, distill_fn: TextWeightedLoss, completion_ids: Tensor) -> Tensor:
        """(B, T) the loss's weight of each completion token from the decoded tokens of its row (GUI-SD's digit
        significance)."""
        if self.decode_tokens is None:
            raise ValueError("a text-weighted distillation loss needs the tokenizer's decode_tokens")
        rows = [distill_fn.text_weights(pieces) for pieces in token_pieces(self.decode_tokens, completion_ids)]
        return torch.tensor(rows, dtype=torch.float32, device=completion_ids.device)

    def term(
        self,
        inputs: dict[str, Any],
        entries: RLSDEntries,
        plan: StepPlan,
        student: Hidden,
        teacher: Hidden,
        student_logps: torch.Tensor,
        others: list[Hidden] | None = None,
    ) -> torch.Tensor:
        """The term of micro-batch `inputs` under the loss and coefficient of `plan`: rows without context (or
        gated out, `entries.distill_weight` = 0) contribute zero. With MAD-OPD's further teachers (`others`), the loss
        is their confidence-weighted sum with `teacher`'s (`rlsd.core.distill.selected_mad_opd_loss`); with SDPG's
        reference log-probs (`entries.ref_logps`), its anchor on `student_logps` is added."""
        args, distill_fn = self.args, plan.distill_fn
        mode = "train" if self.training() else "eval"
        token_mask = loss_mask(inputs).float()
        weights = token_mask * entries.distill_weight.unsqueeze(1)
        routed = isinstance(distill_fn, RoutedTokenLoss)
        if routed:  # only the tokens some route takes are distilled
            labels = entries.distill_labels
            routes = torch.tensor(list(distill_fn.routes), dtype=labels.dtype, device=labels.device)
            weights = weights * torch.isin(labels, routes)
        if isinstance(distill_fn, TextWeightedLoss):  # GUI-SD: each token also weighted by the completion's text
            weights = weights * self.text_weights(distill_fn, inputs["completion_ids"]).to(weights)
        selected = weights > 0
        tokens = token_mask.sum().clamp(min=1.0)
        accumulation = self.accumulation() if mode == "train" else 1
        (student_hidden, student_head), (teacher_hidden, teacher_head) = student, teacher
        # the same keys on every process (NaN where nothing was distilled): metrics are gathered
        metrics = {
            "distill_token_frac": TokenMean((selected.sum() / tokens).item(), token_mask.sum().item()),
            "distill_loss": TokenMean(math.nan, 0),
        }
        probing = args.distill_overlap_k > 0 and not others and not routed
        probe = OverlapProbe(args.distill_overlap_k) if probing else None
        if probe is not None:
            metrics["topk_overlap"] = TokenMean(math.nan, 0)
        # every process gathers FSDP2-sharded heads and runs the backward, also with no selected token (then 0)
        if others:
            per_token, mad_weights = selected_mad_opd_loss(
                distill_fn, student_hidden, [teacher_hidden, *(hidden for hidden, _ in others)], selected,
                (student_head, [teacher_head, *(head for _, head in others)]), self.temperature,
                inputs["completion_ids"], confidence=args.mad_opd_confidence, mad_temperature=args.mad_opd_temperature,
                chunk_tokens=args.distill_chunk_tokens,
            )  # fmt: skip
            for index, row in enumerate(mad_weights):
                mean = row.mean().item() if row.numel() else math.nan
                metrics[f"mad_weight_{index}"] = TokenMean(mean, row.numel())
        elif routed:
            per_token = routed_token_loss(
                distill_fn, labels, student_hidden, teacher_hidden, selected, (student_head, teacher_head),
                self.temperature, chunk_tokens=args.distill_chunk_tokens, sampled_ids=inputs["completion_ids"],
            )  # fmt: skip
        else:
            per_token = selected_token_loss(
                distill_fn, student_hidden, teacher_hidden, selected, (student_head, teacher_head),
                self.temperature, chunk_tokens=args.distill_chunk_tokens, overlap=probe,
                sampled_ids=inputs["completion_ids"],
            )  # fmt: skip
        if probe is not None and per_token.numel():
            metrics["topk_overlap"] = TokenMean(probe.values().mean().item(), per_token.numel())
        distill = (per_token * weights[selected]).sum() / tokens
        if per_token.numel():
            mass = weights[selected].sum()
            metrics["distill_loss"] = TokenMean(
                ((per_token.detach() * weights[selected]).sum() / mass).item(), mass.item()
            )
        term = plan.distill_coef * distill
        if entries.ref_logps is not None:
            penalty = (sdpg_ref_penalty(student_logps, entries.ref_logps) * token_mask).sum() / tokens
            metrics["ref_penalty"] = TokenMean(penalty.item(), token_mask.sum().item())
            term = term + args.sdpg_ref_coef * penalty
        self.log(mode, metrics)
        return term / accumulation
