"""The step's collaborators, built from one `RunView` (what they read from the run, gathered once by the trainer from
TRL's attributes, so that none of them holds the trainer), and `RolloutCredit`: what a rollout does after TRL's own
(the teacher's prompts, the teacher pass, the token credit handed back to TRL)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from rlsd.config import RLSDConfig
from rlsd.context import vision
from rlsd.context.prompts import RolloutTap, TeacherPrompts
from rlsd.context.sources import PrivilegedSource
from rlsd.core.contrast_rule import log_mean_exp
from rlsd.core.credit import grpo_advantages
from rlsd.data.reward_range import check_reward_statistics
from rlsd.data.rewards import reward_totals
from rlsd.engines.generation import run_generation_config
from rlsd.engines.vllm_teacher import served_teacher
from rlsd.infra.run_guard import model_context_length
from rlsd.plan import StepPlan
from rlsd.step.assign import CreditAssembler
from rlsd.step.batch import RLSDEntries, loss_mask, scalar
from rlsd.step.distill_term import DistillationTerm
from rlsd.step.near_future import NearFutureSlots
from rlsd.step.rollout_term import NoTeacherRollouts, TeacherRolloutTerm
from rlsd.step.scorer import Scorer, TokenizePrompts, TrlLogps
from rlsd.teachers import NearFutureTeacher, Teachers

CONTRAST = "teacher_contrast_logps"
"""The signal of a rule that contrasts the teacher after the source's negative contexts (RLCSD): K more passes."""


@dataclass(frozen=True, kw_only=True)
class RunView:
    """What the collaborators read from the run: values, and callables for what changes while it trains (the mode,
    the active stage's plan, HF's accumulation count). The trainer fills it from TRL's attributes (its seams table)."""

    accelerator: Accelerator
    args: RLSDConfig
    source: PrivilegedSource  # the run's privileged source
    model: Callable[[], torch.nn.Module]  # the policy as TRL holds it (prepared, maybe wrapped)
    training: Callable[[], bool]  # whether the policy is in training mode
    accumulation: Callable[[], int]  # HF's `current_gradient_accumulation_steps`
    plan: Callable[[], StepPlan]  # the active stage's plan
    lam: Callable[[int], float]  # the rule's lambda at an optimizer step (`Stages.lam`)
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    record: Callable[[str, str, float], None]  # appends one value of this process to TRL's metric of a mode
    tokenizer: Any  # the text tokenizer of the processing class
    tokenize_prompts: TokenizePrompts
    processing_class: Any
    is_vlm: bool
    image_pad_token_id: int | None
    temperature: float
    generation_config: Any  # TRL's `GenerationConfig`
    eos_token_ids: list[int]
    group_sizes: tuple[int, int]  # completions per prompt (training, evaluation)
    batch_sizes: tuple[int, int]  # TRL's per-device batch (training, evaluation)
    reward_weights: torch.Tensor
    trl_logps: TrlLogps  # TRL's own scoring forward, bypassing the trainer's override
    trl_rewards: Callable[..., torch.Tensor]  # TRL's own `_calculate_rewards`
    sharded: bool  # FSDP or DeepSpeed
    vllm: Callable[[], Any] | None = None  # TRL's colocated vLLM generation (`vllm_generation`), with use_vllm


class Collaborators(NamedTuple):
    """The step's collaborators, each handed what it reads from one `RunView`."""

    scorer: Scorer
    prompts: TeacherPrompts
    distill_term: DistillationTerm
    credit: CreditAssembler
    rollout_term: TeacherRolloutTerm | NoTeacherRollouts
    rollout: RolloutCredit


def build_collaborators(run: RunView, teachers: Teachers, rule_state: Any) -> Collaborators:
    """Every collaborator of a step: the no-grad passes, the teacher prompts, the distillation term, the credit
    assembly, the teacher-rollout term `args.teacher_rollout_loss` names, and the rollout's credit."""
    args = run.args
    if run.generation_config is None:  # vLLM generates the rollouts: TRL built no transformers GenerationConfig
        run = replace(run, generation_config=run_generation_config(args, run.tokenizer, run.eos_token_ids,
                                                                   run.temperature))  # fmt: skip
    if CONTRAST in run.plan().rule.needs and not hasattr(run.source, "negative_contexts"):
        raise ValueError(
            f"credit={run.plan().rule.name!r} contrasts the teacher after negative contexts, which "
            f"privileged_source={args.privileged_source!r} does not give: use privileged_source='contrast'"
        )
    scorer = Scorer(
        accelerator=run.accelerator, model=run.model, teacher=teachers.teacher, reference=teachers.reference,
        trl_logps=run.trl_logps, temperature=run.temperature,
        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs, prefix_sharing=args.teacher_prefix_sharing,
        per_row_context=run.source.needs_completions or run.source.needs_generator, sharded=run.sharded,
        group_sizes=run.group_sizes, batch_sizes=run.batch_sizes, training=run.training,
        tokenize_prompts=run.tokenize_prompts, tokenizer=run.tokenizer, generation_config=run.generation_config,
        eos_token_ids=run.eos_token_ids, served=served_teacher(args, teachers.teacher, run.vllm, run.accelerator,
                                                               run.processing_class, sharded=run.sharded),
    )  # fmt: skip
    prompts = TeacherPrompts(
        accelerator=run.accelerator, source=run.source, teacher_template=args.teacher_template,
        teacher_transform=args.teacher_transform, privileged_source=args.privileged_source, tokenizer=run.tokenizer,
        tokenize_prompts=run.tokenize_prompts, is_vlm=run.is_vlm, image_pad_token_id=run.image_pad_token_id,
        processing_class=run.processing_class, group_size=scorer.group_size, generate=scorer.generate_texts,
        log=run.log, teacher_use=lambda: vision.teacher_use(run.plan()),
        context_length=model_context_length(run.accelerator.unwrap_model(run.model()).config),
    )  # fmt: skip
    distill_term = DistillationTerm(
        args=args, temperature=run.temperature, log=run.log, training=run.training, accumulation=run.accumulation,
        decode_tokens=run.tokenizer.batch_decode,
    )  # fmt: skip
    credit = CreditAssembler(
        accelerator=run.accelerator, args=args, rule_state=rule_state, log=run.log, group_size=scorer.group_size,
        decode_tokens=run.tokenizer.batch_decode,
        vocab_size=run.accelerator.unwrap_model(run.model()).config.get_text_config().vocab_size,
    )  # fmt: skip
    rollout_term: TeacherRolloutTerm | NoTeacherRollouts = NoTeacherRollouts()
    if args.teacher_rollout_loss != "none":
        rollout_term = TeacherRolloutTerm.build(
            accelerator=run.accelerator, args=args, source=run.source, tokenizer=run.tokenizer,
            generation_config=run.generation_config, eos_token_ids=run.eos_token_ids, temperature=run.temperature,
            reward_weights=run.reward_weights, tokenize_prompts=run.tokenize_prompts,
            teacher_inputs=lambda *a: prompts.build(*a, distill=run.plan().distill_fn is not None),
            scoring_model=scorer.scoring_model, score=scorer.score, trl_logps=scorer.trl_logps,
            trl_rewards=run.trl_rewards, log=run.log, group_size=scorer.group_size,
            scoring_batch_size=scorer.scoring_batch_size, training=run.training, accumulation=run.accumulation,
        )  # fmt: skip
    near_future = NearFutureSlots(run, teachers.teacher) if isinstance(teachers.teacher, NearFutureTeacher) else None
    rollout = RolloutCredit(run, scorer, prompts, distill_term, credit, rollout_term, near_future)
    return Collaborators(scorer, prompts, distill_term, credit, rollout_term, rollout)


@dataclass(frozen=True)
class RolloutCredit:
    """What a rollout adds after TRL's rollout and rewards: the teacher's prompts, the teacher pass and the (B, T)
    token advantages (or, when they wait for the loss's forward, the `RLSDEntries` that let the loss compute them),
    SDPG's reference log-probs and the teacher-rollout term's entries."""

    run: RunView
    scorer: Scorer
    prompts: TeacherPrompts
    distill_term: DistillationTerm
    credit: CreditAssembler
    rollout_term: TeacherRolloutTerm | NoTeacherRollouts
    near_future: NearFutureSlots | None = None  # NPO's slot replacement (teacher="near_future")

    def complete(self, inputs: list[dict[str, Any]], output: dict[str, Any], tap: RolloutTap, step: int) -> dict:
        """The batch TRL buffers for the rollout `output` of `inputs` (`tap`: what the rollout recorded) at optimizer
        step `step` (1-based), under the active plan."""
        plan, mode = self.run.plan(), "train" if self.run.training() else "eval"
        replaced = self.near_future is not None and mode == "train" and self.near_future.intervene(inputs, output, tap)
        if replaced and output.get("old_per_token_logps") is not None:  # the guide's rows, under the rollout's policy
            output["old_per_token_logps"] = self.scorer.rescore("student", output).logps
        mask = loss_mask(output)
        lam = self.run.lam(step) if plan.rule_uses_teacher else 0.0
        if plan.rule_uses_teacher:
            self.run.record(mode, "rlsd/lambda", lam)
        rule_pass = plan.teacher_pass_needed(lam, self.run.args.rlsd_clip)
        entries = RLSDEntries()
        rows = self.credit.teacher_rows(output["advantages"]) if plan.skips_known_credit and rule_pass else None
        distill = plan.distill_fn is not None
        if rule_pass or distill:
            teacher = self.prompts.build(inputs, output, mode, rows, tap, distill=distill)
            prompt_ids, prompt_mask, types, entries.has_context = teacher
            if "token_labels" in plan.rule.needs:  # the source's labels (annotation spans), for a rule reading them
                entries.token_labels = tap.token_labels
            if distill:  # the loss-time teacher pass needs the teacher's prompt
                self.distill_term.rollout_entries(
                    plan, entries, teacher, output["advantages"], tap.row_weights, tap.token_labels, step, mode
                )
        if self.scorer.reference is not None and plan.distill_loss == "sdpg":
            entries.ref_logps = self.scorer.rescore("reference", output).logps
        if not rule_pass:
            output["advantages"], _ = grpo_advantages(output["advantages"], mask)
            if entries.policy_mask is not None:  # a routed loss's tokens leave the policy gradient
                output["advantages"] = output["advantages"] * entries.policy_mask.to(output["advantages"])
                entries.policy_mask = None  # applied: it need not travel to the loss
            if plan.rule_uses_teacher:
                self.run.record(mode, "rlsd/teacher_time_s", 0.0)
            self.rollout_term.add(inputs, output, entries, mode)
            return {**output, **entries.to_batch()}

        entries.seq_advantages = output["advantages"]
        entries.lam = scalar(lam)
        pass_logps = None
        # the loss-time teacher pass may give the rule its log-probs only when the student's log-probs also come from
        # the loss's own forward: with TRL's old log-probs (rollout-time weights) the teacher is scored now, so that
        # tau and s are taken from the same weights
        at_loss = plan.teacher_at_loss and output.get("old_per_token_logps") is None
        if not at_loss:
            start = time.perf_counter()
            entropy = "teacher_entropy" in plan.rule.needs
            scores = self.scorer.teacher_rows(output, prompt_ids, prompt_mask, types, rows, entropy=entropy)
            contrast = self.contrast_logps(inputs, output, mode, rows, tap) if CONTRAST in plan.rule.needs else None
            self.run.record(mode, "rlsd/teacher_time_s", time.perf_counter() - start)
            pass_logps = self.credit.teacher_pass(entries, output, scores, rows, mask, mode, contrast=contrast)
        self.rollout_term.add(inputs, output, entries, mode, pass_logps)
        student_logps = output.get("old_per_token_logps")
        if student_logps is None and "group_ids" in plan.rule.needs:  # group statistics need the whole group now
            student_logps = self.scorer.rescore("student", output).logps
        if student_logps is not None and not at_loss:  # the credit is final at rollout time
            self.credit.finalize(plan.rule, entries, output, student_logps, mode)
        return {**output, **entries.to_batch()}

    def reward_totals(self, rewards_per_func: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The weighted total reward of each row of TRL's (B_global, n_funcs) rewards, once TRL's float32 group
        statistics of them are checked finite (`check_reward_statistics`: an overflow names the functions and rows)."""
        args = self.run.args
        group_size = self.run.group_sizes[0 if self.run.training() else 1]
        check_reward_statistics(rewards_per_func, self.run.reward_weights, names, group_size, args.scale_rewards,
                                args.multi_objective_aggregation)  # fmt: skip
        return reward_totals(rewards_per_func, self.run.reward_weights)

    def contrast_logps(
        self, inputs: list[dict[str, Any]], output: dict[str, Any], mode: str, rows: torch.Tensor | None,
        tap: RolloutTap,
    ) -> torch.Tensor:  # fmt: skip
        """The teacher's log-probs of `rows` after the source's negative contexts (RLCSD's wrong siblings): one pass
        per negative slot, the same number on every process, combined per token as the log-mean-exp over the slots
        each row fills (`rlsd.core.contrast_rule.log_mean_exp`)."""
        passes = self.prompts.negatives(inputs, output, mode, rows, tap)
        logps = [self.scorer.teacher_rows(output, ids, mask, types, rows, entropy=False).logps
                 for ids, mask, types, _ in passes]  # fmt: skip
        return log_mean_exp(torch.stack(logps), torch.stack([teacher.has_context for teacher in passes]))
