"""One `StepPlan` per Sparse-to-Dense stage: what a rollout and its loss compute, decided once, never by mutating
the config.

A plan holds the stage's field values (`rlsd.core.stages.STAGE_FIELDS`, the config's own where the stage is silent),
the credit rule and distillation loss built from them, and the two decisions that follow: whether the teacher may skip
rows whose credit is known (A_i = 0 under a multiplicative rule), and whether the rule's teacher log-probs may come
from the distillation's loss-time teacher pass. Without `stages` there is one plan; `Stages` builds and caches one per
stage index and answers which plan an optimizer step runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from rlsd.core.credit import rlsd_lambda
from rlsd.core.distill import LOSS_KNOBS, token_loss_fn
from rlsd.core.rules import CreditRule, get_rule
from rlsd.core.stages import STAGE_FIELDS, reachable, stage_index, stage_values


@dataclass(frozen=True)
class StepPlan:
    """What the steps of one stage compute (see the module docstring)."""

    stage: int | None  # the stage's index in `stages`; None without stages
    values: Mapping[str, Any]  # the stage's STAGE_FIELDS values
    rule: CreditRule
    distill_fn: Any  # the per-token distillation loss, None without one
    skips_known_credit: bool  # the teacher renders and scores only the rows with A_i != 0
    teacher_at_loss: bool  # the rule may read the loss-time teacher pass of the distillation term

    @property
    def rule_uses_teacher(self) -> bool:
        """The credit rule reads the teacher's log-probs."""
        return "teacher_logps" in self.rule.needs

    @property
    def uses_teacher(self) -> bool:
        """The rule or the distillation loss needs a teacher."""
        return self.rule_uses_teacher or self.distill_fn is not None

    def __getattr__(self, name: str) -> Any:
        """A stage field's value (`plan.credit`, `plan.distill_coef`, ...)."""
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"StepPlan has no field {name!r}")

    def teacher_pass_needed(self, lam: float, clip: float) -> bool:
        """The rule's teacher pass runs unless the rule ignores the teacher or its multiplier is identically 1
        (lam = 0 or eps_w = 0 for the rules that reduce to GRPO there)."""
        if not self.rule_uses_teacher:
            return False
        if self.rule.grpo_when_lambda_zero:
            return lam > 0.0 and clip > 0.0
        return True


def build_plan(args: Any, values: Mapping[str, Any], stage: int | None, *, row_subsets: bool) -> StepPlan:
    """The plan of one stage's `values`; `row_subsets` False (vision models, whose vision tensors are not sliced by
    rows) makes the teacher score every row."""
    rule = get_rule(values["credit"])
    loss = values["distill_loss"]
    knobs = {key: values[key] for key in LOSS_KNOBS if key in values}
    distill_fn = None if loss == "none" else token_loss_fn(loss, args, **knobs)
    teacher_at_loss = (
        distill_fn is not None
        and "teacher_logps" in rule.needs
        and not {"group_ids", "teacher_entropy", "teacher_contrast_logps"} & rule.needs
        and rule.state is None
    )
    return StepPlan(
        stage=stage,
        values=MappingProxyType(dict(values)),
        rule=rule,
        distill_fn=distill_fn,
        skips_known_credit=row_subsets and rule.multiplicative and distill_fn is None,
        teacher_at_loss=teacher_at_loss,
    )


@dataclass(frozen=True)
class RunNeeds:
    """What any plan a run can reach needs, decided once at construction."""

    teacher: bool  # a rule reads the teacher, a distillation loss distils from it, or it generates (teacher rollouts)
    distill: bool  # a distillation loss runs (its loss-time teacher pass)
    teacher_entropy: bool  # a rule reads the teacher's entropy
    sdpg_reference: bool  # SDPG's anchor to the initial model


class Stages:
    """The plans of a run: one per stage index (built on first use), chosen by optimizer step."""

    def __init__(self, args: Any, *, row_subsets: bool) -> None:
        self.args = args
        self.row_subsets = row_subsets
        self.base = MappingProxyType({name: getattr(args, name) for name in STAGE_FIELDS})
        self._plans: dict[int | None, StepPlan] = {}

    def plan(self, index: int | None) -> StepPlan:
        """The plan of stage `index` (None: the config's own values, the only plan without stages)."""
        if index not in self._plans:
            values = self.base if index is None else stage_values(self.args.stages, index, dict(self.base))
            self._plans[index] = build_plan(self.args, values, index, row_subsets=self.row_subsets)
        return self._plans[index]

    def plan_for(self, step: int) -> StepPlan:
        """The plan of optimizer step `step` (1-based); it depends on the step alone, so every process agrees."""
        return self.plan(stage_index(self.args.stages, step) if self.args.stages else None)

    def reachable(self) -> list[StepPlan]:
        """Every plan a run can reach: what is built once (the teacher, SDPG's reference, the checks) is built when
        any of them needs it."""
        if not self.args.stages:
            return [self.plan(None)]
        return [self.plan(index) for index in reachable(self.args.stages)]

    def lam(self, step: int) -> float:
        """lam_k of optimizer step `step` (1-based): RLSD's schedule from the config (no stage sets it)."""
        args = self.args
        return rlsd_lambda(step, lam0=args.rlsd_lambda, warmup_steps=args.rlsd_lambda_warmup_steps,
                           decay_steps=args.rlsd_lambda_decay_steps)  # fmt: skip

    def needs(self) -> RunNeeds:
        """What the plans this run can reach need (the teacher, SDPG's reference and the checks are built once)."""
        plans, args = self.reachable(), self.args
        return RunNeeds(
            teacher=any(plan.uses_teacher for plan in plans)
            or args.teacher_rollout_loss != "none"
            or getattr(args, "npo_trigger", "none") != "none",  # NPO's near-future guide is the run's teacher
            distill=any(plan.distill_fn is not None for plan in plans),
            teacher_entropy=any("teacher_entropy" in plan.rule.needs for plan in plans),
            sdpg_reference=args.sdpg_ref_coef > 0 and any(plan.distill_loss == "sdpg" for plan in plans),
        )
