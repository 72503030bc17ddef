"""`CreditAssembler`: a rollout's signals turned into (B, T) token advantages for `RLSDTrainer`.
The rollout's teacher log-probs (and entropy), the student's, the sequence advantages and the rule state's values
become the rule's `Signals`; the rule runs on the scored rows, on TRL's global groups or on the whole batch, and its
metrics are logged under `rlsd/`. The assembler receives values and callables, never the trainer: the TRL
attributes behind them are read where the trainer builds it (`rlsd.trainer`'s seams table). The rule changes with
the Sparse-to-Dense stage, so each call is handed the active one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from rlsd.config import RLSDConfig
from rlsd.context.annotation import span_token_labels, token_char_offsets
from rlsd.core.credit import think_span_mask
from rlsd.core.rules import CreditRule, RuleFn, RuleParams, RuleState, Signals, rule_params
from rlsd.core.srpo_rule import role_char_spans
from rlsd.step.batch import RLSDEntries, loss_mask, scalar, token_pieces
from rlsd.step.scoring import ScoreResult

DecodeTokens = Callable[[torch.Tensor], list[str]]
"""The tokenizer's `batch_decode`: a (T, 1) column of token ids -> each token's text."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CreditAssembler:
    """Which rows the teacher scores (`teacher_rows`), the rule state's values of a batch (`state_values`) and the
    (B, T) token advantages of a rule (`assign`). Built once by the trainer from what these read; `args` (the active
    stage's fields) is read at each call."""

    accelerator: Accelerator  # gather, reduce, pad_across_processes, process_index, is_main_process
    args: RLSDConfig
    rule_state: RuleState | None  # a stateful rule's state, kept across training batches (None without one)
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    group_size: Callable[[], int]  # completions per prompt in the current mode
    decode_tokens: DecodeTokens  # each token's text, for the reasoning span (`rlsd_span="think"`)
    vocab_size: int  # the policy's text vocabulary size, a signal some rules read

    def teacher_rows(self, seq_advantages: torch.Tensor) -> torch.Tensor:
        """Indices of the rows the teacher scores under a multiplicative rule: those with A_i != 0 in batch order,
        topped up with rows of known credit to the largest such count over processes, so that every process runs
        the same number of forward chunks (a sharded model gathers its parameters collectively in each)."""
        scored = seq_advantages != 0
        count = scored.sum().reshape(1)
        target = int(self.accelerator.gather(count).max().item())
        order = torch.cat([scored.nonzero().flatten(), (~scored).nonzero().flatten()])
        return order[:target]

    def state_values(self, entries: RLSDEntries, mask: torch.Tensor, mode: str) -> dict[str, float]:
        """A stateful rule's values for this batch: a training batch feeds the global token means of the signals
        the state reads (e.g. AntiSD's teacher entropy) and moves it; an eval batch reads it as training left it."""
        if self.rule_state is None:
            return {}
        if mode != "train":
            return self.rule_state.current()
        means = {}
        for name in self.rule_state.reads:
            values = getattr(entries, name)
            totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]).double(), "sum")
            means[name] = (totals[0] / totals[1].clamp(min=1)).item()
        return self.rule_state.observe(means)

    def teacher_pass(
        self, entries: RLSDEntries, output: dict[str, Any], scores: ScoreResult, rows: torch.Tensor | None,
        mask: torch.Tensor, mode: str, *, contrast: torch.Tensor | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """The rollout's teacher pass (`scores` of `rows`, all rows when None; `contrast`: its log-mean-exp after
        the negative contexts, for a rule that reads them) and the rule state's values into `entries`; the pass's
        log-probs when every row was scored (PBSD reuses them as log pi_T(y- | x_T)), else None. With `rows`, the rule
        scores only the rows with A_i != 0; the others keep A_it = 0."""
        entries.teacher_logps, entries.teacher_entropy = scores.logps, scores.entropy
        entries.teacher_contrast_logps = contrast
        if rows is not None:
            entries.scored = output["advantages"] != 0
        entries.state_values = {key: scalar(v) for key, v in self.state_values(entries, mask, mode).items()}
        return scores.logps if rows is None else None

    def finalize(
        self, rule: CreditRule, entries: RLSDEntries, output: dict[str, Any], student_logps: torch.Tensor, mode: str
    ) -> None:
        """The credit made final at rollout time (the student's log-probs are known): `output`'s (B, T) advantages,
        and `entries` no longer carrying deferred credit."""
        output["advantages"] = self.assign(rule, entries, output, student_logps, mode)
        entries.seq_advantages = entries.teacher_logps = entries.teacher_entropy = entries.scored = None
        entries.teacher_contrast_logps = entries.token_labels = entries.policy_mask = None
        entries.lam, entries.state_values = None, {}

    def assign(
        self, rule: CreditRule, entries: RLSDEntries, batch: dict[str, Any], student_logps: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """Apply `rule` (the active stage's) to a batch's deferred credit; log its metrics under `rlsd/`."""
        mask = loss_mask(batch)
        # a row without privileged context gets Delta = 0: its teacher is the student itself
        teacher_logps = torch.where(entries.has_context.unsqueeze(1), entries.teacher_logps, student_logps)
        contrast = entries.teacher_contrast_logps  # ... and the same teacher after its negatives: e_ctr = 0
        if contrast is not None:
            contrast = torch.where(entries.has_context.unsqueeze(1), contrast, teacher_logps)
        signals = Signals(
            seq_advantages=entries.seq_advantages,
            mask=mask,
            teacher_logps=teacher_logps,
            student_logps=student_logps,
            teacher_entropy=entries.teacher_entropy,
            step_ids=step_ids(batch),
            vocab_size=self.vocab_size,
            span_mask=self.think_span(batch) if self.args.rlsd_span == "think" else None,
            teacher_contrast_logps=contrast,
            token_labels=entries.token_labels,
            role_ids=self.role_ids(batch) if "role_ids" in rule.needs else None,
        )
        values = {key: float(value) for key, value in entries.state_values.items()}
        params = rule_params(self.args, lam=float(entries.lam), **values)
        if "group_ids" in rule.needs:
            token_adv, metrics = self.rule_on_global_groups(rule.fn, signals, params, mode)
        elif entries.scored is not None:
            token_adv, metrics = rule_on_rows(rule.fn, signals, params, entries.scored)
        else:
            token_adv, metrics = rule.fn(signals, params)
        self.log(mode, metrics)
        if entries.policy_mask is not None:  # a routed loss's tokens leave the policy gradient
            token_adv = token_adv * entries.policy_mask.to(token_adv)
        return token_adv.to(entries.seq_advantages.dtype)

    def rule_on_global_groups(
        self, rule_fn: RuleFn, signals: Signals, params: RuleParams, mode: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """A rule with group statistics on TRL's global group layout: the signals of every process are gathered
        (padded to the longest completion), groups are consecutive blocks of the mode's group size over the
        gathered rows (they may straddle processes), and each process keeps its own rows. Counts are reported by
        the main process only, since every process computed the same ones."""
        local_rows, local_length = signals.mask.shape
        gathered = {}
        for item in dataclasses.fields(signals):
            value = getattr(signals, item.name)
            if isinstance(value, torch.Tensor):
                padded = self.accelerator.pad_across_processes(value, dim=1) if value.dim() > 1 else value
                gathered[item.name] = self.accelerator.gather(padded)
        total = gathered["mask"].size(0)
        group_ids = torch.arange(total, device=signals.mask.device) // self.group_size()
        everyone = dataclasses.replace(signals, **gathered, group_ids=group_ids)
        token_adv, metrics = rule_fn(everyone, params)
        start = self.accelerator.process_index * local_rows
        if not self.accelerator.is_main_process:
            metrics = {key: (0.0 if key.endswith("_count") else value) for key, value in metrics.items()}
        return token_adv[start : start + local_rows, :local_length], metrics

    def think_span(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) completion tokens inside the reasoning span (`rlsd_span="think"`), from each token's text."""
        ids = batch["completion_ids"]
        span = think_span_mask(token_pieces(self.decode_tokens, ids), ids.size(1))
        return span.to(ids.device) & batch["completion_mask"].bool()

    def role_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) SRPO's role of each completion token (1 perception, 2 reasoning, 0 neither): the character spans of
        the tagged contents (`srpo_perception_tag`, `srpo_reasoning_tag`) mapped to the tokens whose text overlaps
        them (`rlsd.context.annotation.span_token_labels`)."""
        ids, keep = batch["completion_ids"], batch["completion_mask"].bool()
        tags = (self.args.srpo_perception_tag, self.args.srpo_reasoning_tag)
        roles = []
        for pieces in token_pieces(self.decode_tokens, ids):
            spans = role_char_spans("".join(pieces), *tags)
            roles.append(span_token_labels(token_char_offsets(pieces), spans))
        return torch.tensor(roles, dtype=torch.long, device=ids.device) * keep


def rule_on_rows(
    rule_fn: RuleFn, signals: Signals, params: RuleParams, rows: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """A multiplicative rule on the `rows` (B,) with A_i != 0 only, its metrics over those rows; every other row
    gets A_it = 0, which is what the rule gives a row with A_i = 0 whatever its teacher says."""
    index = rows.nonzero().flatten()
    subset = dataclasses.replace(
        signals,
        **{
            item.name: getattr(signals, item.name)[index]
            for item in dataclasses.fields(signals)
            if isinstance(getattr(signals, item.name), torch.Tensor)
        },
    )
    row_adv, metrics = rule_fn(subset, params)
    token_adv = torch.zeros(signals.mask.shape, dtype=row_adv.dtype, device=row_adv.device)
    return token_adv.index_copy(0, index, row_adv), metrics


def step_ids(batch: dict[str, Any]) -> torch.Tensor:
    """Index of the assistant segment of each completion token: segments are separated by tool outputs (TRL's
    tool mask is 0 on them); a single-turn completion is one step, 0 everywhere."""
    mask = batch["completion_mask"]
    tool_mask = batch.get("tool_mask")
    if tool_mask is None:
        return torch.zeros_like(mask, dtype=torch.long)
    resumes = (tool_mask[:, 1:] == 1) & (tool_mask[:, :-1] == 0)
    return torch.cat([torch.zeros_like(mask[:, :1]), resumes.long().cumsum(1)], dim=1)
