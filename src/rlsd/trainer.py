"""`RLSDTrainer`: TRL's `GRPOTrainer` with token-level credit from a privileged self-teacher.

The trainer only overrides TRL's hooks. Each job is a collaborator built by `rlsd.step.wiring` from one `RunView`
(values and callables read from TRL here, never the trainer; `tests/test_layout.py` checks both). After TRL's rollout
and rewards, `RolloutCredit` has `TeacherPrompts` (`rlsd.context`) build each row's teacher prompt, the `Scorer`
(`rlsd.step.scorer`, the no-grad passes) score [teacher prompt ; completion] and the `CreditAssembler`
(`rlsd.step.assign`) turn the credit rule (`rlsd.core.rules`) into (B, T) advantages for TRL; the student's log-probs
are TRL's old log-probs when it computes them, else the loss's own forward, detached. A step follows its stage's
`StepPlan` (`rlsd.plan`; the config is never changed). With a distillation loss the teacher runs once, at loss time,
and `DistillationTerm` adds its term; `teacher_rollout_loss` adds a registered term on teacher trajectories
(`rlsd.step.rollout_term`). What travels from rollout to loss is `rlsd.step.batch.RLSDEntries`.

Seams with TRL 1.16.0 (`trl/trainer/grpo_trainer.py`) and transformers' `Trainer`: everything this class overrides or
reads that is not public API, the behaviour relied on, and the test that fails when it changes. Upgrading TRL means
reviewing this table (`tests/test_layout.py` checks it against the code).

- `_generate_and_score_completions` (override): returns the rollout dict (`prompt_ids`, `prompt_mask`,
  `completion_ids`, `completion_mask`, `advantages` (B,), optional `old_per_token_logps`, `tool_mask`, vision keys)
  that TRL buffers, shuffles and splits by rows (0-dim tensors copied). Guarded by `test_parity_with_trl_grpo_trainer`,
  `test_student_logps_come_from_trl_old_logps_when_available`.
- `_calculate_rewards` (override, and TRL's called): `(inputs, prompts, completions, completion_ids)` returns
  (B_global, n_funcs) rewards gathered over processes (a collective), NaN where a function abstains; called once per
  rollout before the teacher context, and by BRTS on the teacher's trajectories. Guarded by
  `test_two_processes_share_sibling_contexts_and_the_distillation_term`,
  `test_brts_scores_the_teacher_trajectories_with_the_reward_functions`.
- `_compute_loss` (override): computes the loss of one micro-batch from `inputs["advantages"]` ((B,) or (B, T)),
  calling `_get_per_token_logps_and_entropies` once for the policy first. Guarded by
  `test_deferred_credit_without_the_scoring_hook_raises`, `test_a_training_step_runs_under_every_loss_type`.
- `_get_per_token_logps_and_entropies` (override, called): `(model, input_ids, attention_mask, logits_to_keep,
  batch_size, compute_entropy, **vision)` -> (logps, entropies, aux); uses the fused head installed by
  `add_fused_lm_head`; TRL's own (not the override) is handed to `rlsd.step.scorer.Scorer` and `TeacherRollouts` as
  the partial `trl_logps`. Guarded by `test_teacher_logps_align_with_a_direct_forward`,
  `test_rlsd_adds_exactly_one_forward_pass_per_step`.
- `_tokenize_prompts` (called): renders and tokenizes prompts as the rollout does (chat template, processor with
  images) -> (ids, _, fields with token-type ids). Guarded by `test_teacher_logps_align_with_a_direct_forward`,
  `test_teacher_logps_equal_a_direct_forward_with_the_image`.
- `processing_class` (read): the processor; its `image_processor` turns the images a teacher transform
  (`teacher_transform`) shows the teacher into the model's inputs, as TRL's processor call does for the student's.
  Guarded by `test_blank_images_reach_the_teacher_through_the_processor`.
- `_tokenizer`, `_is_vlm`, `_image_pad_token_id` (read): the text tokenizer of the processing class, whether it is a
  processor, the image-pad token id. Guarded by `test_teacher_prompt_keeps_image_blocks_and_rewrites_the_last_text`.
- `num_generations`, `num_generations_eval` (read): group sizes; groups are consecutive rows of the gathered batch,
  process-major. Guarded by `test_uni_opd_groups_straddling_processes_follow_the_global_layout`,
  `test_two_processes_uni_opd_groups_span_both_ranks`.
- `eos_token_ids` (read): the ids that end a rollout's completion (the tokenizer's end-of-sequence id, then the
  generation config's); the greedy continuations of `teacher_aligned_prompts` stop at them too. Guarded by
  `test_a_trainer_keeps_the_prompts_the_pure_function_ranks_highest`.
- `generation_config`, `vllm_generation` (read): TRL's transformers `GenerationConfig` (absent with `use_vllm`, then
  built alike by `rlsd.engines.generation`); TRL's colocated vLLM engine, whose `llm` serves `teacher_backend="vllm"`.
  Guarded by `test_teacher_generation_follows_the_run_generation_config`, `test_trl_builds_the_engine_we_serve_from`.
- `temperature` (read): sampling temperature that divides the logits in every scoring forward. Guarded by
  `test_teacher_logps_align_with_a_direct_forward`.
- `reward_weights`, `reward_func_names` (read): the rewards' weights in the total, and their names. Guarded by
  `test_sibling_context_shows_a_successful_sibling_and_rows_without_one_get_no_signal`, `test_reward_overflow_named`.
- `tools`, `environment_factories`, `rollout_func`, `environments`, `_environment_pool`, `_tool_call_loop`,
  `_sync_tool_dicts`, `_async_tool_dicts`, `_get_tool_suffix_ids`, `max_completion_length` (read; override; with a
  teacher `rollout_func` is wrapped to check its `env_mask`; factories and tool dicts are wrapped, `rlsd.step.turns`):
  `_tokenize_prompts` renders each row's tool schema by its position, so the teacher scores every row; row i resets
  `environments[i]`; the loop calls row i's tool dicts, appends to `completions` in place, drops a result over the
  budget. Guarded by `test_image_column_with_a_rollout_function_is_refused_with_a_teacher`,
  `test_teacher_scores_the_rollout_conversation_and_credit_skips_environment_tokens`,
  `test_environment_reset_observation_and_tool_schema_reach_the_teacher`, `test_a_tool_that_raises_names_row_and_turn`,
  `test_a_tool_result_over_the_budget_names_row_and_turn`, `test_an_environment_reset_that_raises_names_the_row`.
- `_metrics` (read): `_metrics[mode][key]` lists, averaged and logged by TRL. Guarded by
  `test_rule_metrics_are_token_weighted_across_processes`.
- `current_gradient_accumulation_steps` (read): set by HF's loop; the distillation term divides by it like TRL's loss.
  Guarded by `test_jsd_term_and_its_gradient_equal_a_full_vocabulary_reference`.
- `is_fsdp_enabled`, `is_deepspeed_enabled` (read): how the policy is sharded; TRL's `prepare_fsdp` /
  `prepare_deepspeed` place frozen models. Guarded by `test_copy_teachers_of_a_zero3_partitioned_policy_are_refused`.
- `compute_loss` (override): HF's entry to the loss, before the backward pass. Guarded by
  `test_nan_knob_bypassing_the_config_stops_at_step_one_before_any_save`.
- `_get_grad_norm` (override): HF computes the norm before the optimizer step. Guarded by
  `test_nan_gradient_stops_before_the_optimizer_step_naming_the_parameter`.
- `_save_checkpoint`, `_get_output_dir` (override): HF writes a checkpoint (and rotates) under
  `_get_output_dir(trial)`, which returns the staging folder while `_save_checkpoint` writes one. Guarded by
  `test_kill_while_writing_a_checkpoint_then_resume_exactly_from_the_previous_one`.
- `_load_optimizer_and_scheduler` (override): called once when resuming, after the weights are loaded. Guarded by
  `test_resume_restores_the_synced_teacher_and_continues_exactly`.
- `train` (override): HF's public loop; the checkpoint is verified first, SIGTERM saves and stops. Guarded by
  `test_damaged_checkpoint_is_refused_naming_the_file`, `test_sigterm_saves_exits_143_and_resumes_to_the_same_model`.
- `train_dataset` (assigned): replaced after construction by the rows `teacher_aligned_prompts` keeps
  (`rlsd.step.aligned_prompts`); TRL's dataloader reads it in `get_train_dataloader` / `_get_train_sampler` when
  training starts. Guarded by `test_a_trainer_keeps_the_prompts_the_pure_function_ranks_highest`.
- `add_fused_lm_head`, `use_adapter`, `SyncRefModelCallback`, `create_model_from_path`, `prepare_deepspeed`,
  `prepare_fsdp`, `disable_gradient_checkpointing`, `prepare_multimodal_messages`, `pad`, `VLLMGeneration` (TRL
  helpers called, the first four by `rlsd.teachers`): the fused log-prob head and its `outputs`, adapter switching,
  the weight copy / EMA of the reference model, loading a model by name or path as TRL loads its reference model (the
  external teacher, `dtype` strings and device_map included), frozen-model placement, image blocks placed as the
  rollout places them, left padding, a served teacher's own vLLM engine. Guarded by
  `test_trl_builds_the_engine_we_serve_from`, `test_copy_teacher_with_fp32_head_scores_exactly_like_the_policy`,
  `test_a_live_teacher_asks_the_fused_head_only_for_what_the_rule_reads`,
  `test_peft_synced_teacher_scores_like_the_policy_after_a_sync`, `test_ema_teacher_follows_the_policy_by_its_decay`,
  `test_teacher_prompt_keeps_image_blocks_and_rewrites_the_last_text`,
  `test_external_teacher_logps_equal_a_direct_forward_of_the_external_model`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOTrainer

from rlsd.config import RLSDConfig
from rlsd.context import vision
from rlsd.context.prompts import RolloutTap, TeacherInputs
from rlsd.context.sources import get_source, validate_teacher_template
from rlsd.core.rules import rule_params
from rlsd.data.rewards import guard_rewards
from rlsd.infra import checkpoint as checkpoint_files
from rlsd.infra import preemption
from rlsd.infra.guards import (
    RunFacts,
    check_before_deepspeed,
    check_finite_grad_norm,
    check_finite_loss,
    check_run_supported,
    nonfinite_fix,
)
from rlsd.plan import Stages, StepPlan
from rlsd.step.aligned_prompts import select_aligned_prompts
from rlsd.step.batch import LossState, RLSDEntries
from rlsd.step.metrics import reduce_metrics
from rlsd.step.rollout_term import TeacherRolloutTerm
from rlsd.step.scorer import captured_output
from rlsd.step.scoring import ScoreResult
from rlsd.step.turns import ToolWatch, checked_rollout_func, watch_resets
from rlsd.step.wiring import RunView, build_collaborators
from rlsd.teachers import (
    Teacher,
    TeacherBuild,
    TeacherSyncCallback,
    backbone_and_head,
    build_teachers,
    get_teacher_kind,
    place_frozen,
)

logger = logging.getLogger(__name__)


class RLSDTrainer(GRPOTrainer):
    """GRPO with RLSD token credit (arXiv 2604.03128); with `credit="grpo"` it is TRL's `GRPOTrainer`.

    Takes the arguments of `GRPOTrainer`. The training dataset needs the privileged column
    (`args.privileged_column`) whenever the credit rule uses the teacher.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "rlsd"]
    _name = "RLSD"
    _resume: checkpoint_files.ResumePlan = checkpoint_files.ResumePlan()
    """What `train` verified before HF's loop, read by `_load_optimizer_and_scheduler` (which HF calls inside it)."""
    _staging_root: str | None = None
    """The temporary folder `_save_checkpoint` is writing a checkpoint into; `_get_output_dir` returns it meanwhile."""
    # The two hand-offs through TRL's own call stack, each set only while one TRL call runs (`_handing_over`):
    _rollout_tap: RolloutTap | None = None
    """Open during TRL's rollout (`_generate_and_score_completions`): `_calculate_rewards` records into it."""
    _loss_state: LossState | None = None
    """Open during TRL's loss (`_compute_loss`): its first scoring forward takes it and stores its log-probs."""

    def __init__(self, model: Any, reward_funcs: Any, args: RLSDConfig | None = None, **kwargs: Any) -> None:
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = RLSDConfig(output_dir=f"{model_name.split('/')[-1]}-RLSD")
        if not isinstance(args, RLSDConfig):
            raise TypeError(f"RLSDTrainer needs an RLSDConfig, got {type(args).__name__}")
        validate_teacher_template(args.teacher_template, args.privileged_source)
        # one plan per Sparse-to-Dense stage (`rlsd.plan`; the config is never changed): what is built once (the
        # teacher, SDPG's reference, the checks) is built when any plan the run can reach needs it
        self.needs = needs = Stages(args, row_subsets=True).needs()
        self.source = get_source(args.privileged_source)(args)
        if needs.teacher:
            for split_name in ("train_dataset", "eval_dataset"):
                self.source.check_dataset(kwargs.get(split_name), split_name)
        if needs.teacher and not args.disable_dropout:
            # the teacher scores in eval mode; dropout in the student's train-mode forward would enter Delta
            logger.info("a self-teacher is used: setting disable_dropout=True (TRL then zeroes every nn.Dropout)")
            args.disable_dropout = True
        super().__init__(model, guard_rewards(reward_funcs, args.reward_timeout), args=args, **kwargs)
        self.has_images = any(vision.image_dataset(kwargs.get(split)) for split in ("train_dataset", "eval_dataset"))
        facts = RunFacts(has_images=self.has_images, is_vlm=self._is_vlm, tools=bool(self.tools),
                         environment_factory=self.environment_factories is not None,
                         rollout_func=self.rollout_func is not None, zero_stage=self._zero_stage())  # fmt: skip
        policy = self.accelerator.unwrap_model(self.model)
        check_run_supported(args, policy, kwargs, teacher=needs.teacher, distill=needs.distill, facts=facts)
        self.rollout_func = checked_rollout_func(self.rollout_func, needs.teacher, vision.teacher_use(args))
        pool, batch = (lambda: self._environment_pool), (lambda: self.environments)
        self.environment_factories = watch_resets(self.environment_factories, pool, batch)
        if args.teacher_rollout_loss != "none":
            TeacherRolloutTerm.check_supported(
                args, policy, kwargs, images=self.has_images,
                tools=bool(self.tools), fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled,
            )  # fmt: skip
        # a vision model (rows would slice its tensors) or environments (tool schemas by row): every row is scored
        self.stages = Stages(args, row_subsets=not self._is_vlm and self.environment_factories is None)
        self.plan: StepPlan = self.stages.plan_for(1)  # the plan of the step the next training rollout trains

        self.rule_state = self.plan.rule.state.from_params(rule_params(args)) if self.plan.rule.state else None
        # the teacher of kind `args.teacher`, MAD-OPD's further teachers and SDPG's anchor, placed like TRL's reference
        columns = ("prompt", *((args.privileged_column,) if "answer" in self.source.fills else ()))
        build = TeacherBuild(
            args, policy, tokenizer=self._tokenizer, dataset=kwargs.get("train_dataset"), text_columns=columns,
            temperature=self.temperature, with_entropy=needs.teacher_entropy, distill=needs.distill,
        )  # fmt: skip
        place = functools.partial(place_frozen, accelerator=self.accelerator, deepspeed=self.is_deepspeed_enabled,
                                  fsdp=self.is_fsdp_enabled)  # fmt: skip
        teachers = build_teachers(build, place, uses_teacher=needs.teacher, sdpg_reference=needs.sdpg_reference)
        self.teacher: Teacher | None = teachers.teacher
        self.mad_teachers: list[Teacher] = teachers.mad
        self.reference: Teacher | None = teachers.reference
        if self.teacher is not None and get_teacher_kind(args.teacher).follows_policy:
            self.add_callback(TeacherSyncCallback(self))
        # the collaborators, each handed what it reads from one view of the run, never the trainer
        run = RunView(
            accelerator=self.accelerator, args=args, source=self.source, model=lambda: self.model,
            training=lambda: self.model.training, accumulation=lambda: self.current_gradient_accumulation_steps,
            plan=lambda: self.plan, lam=self.stages.lam, log=self._log_across_processes,
            record=lambda mode, key, value: self._metrics[mode][key].append(value), tokenizer=self._tokenizer,
            tokenize_prompts=self._tokenize_prompts, processing_class=self.processing_class, is_vlm=self._is_vlm,
            image_pad_token_id=self._image_pad_token_id, temperature=self.temperature,
            generation_config=self.generation_config if hasattr(self, "generation_config") else None,
            group_sizes=(self.num_generations, self.num_generations_eval), eos_token_ids=self.eos_token_ids,
            batch_sizes=(args.per_device_train_batch_size, args.per_device_eval_batch_size),
            reward_weights=self.reward_weights, vllm=lambda: self.vllm_generation,
            trl_logps=functools.partial(GRPOTrainer._get_per_token_logps_and_entropies, self),
            trl_rewards=functools.partial(GRPOTrainer._calculate_rewards, self),
            sharded=self.is_fsdp_enabled or self.is_deepspeed_enabled,
        )  # fmt: skip
        parts = build_collaborators(run, teachers, self.rule_state)
        self.scorer, self.prompts, self.distill_term, self.credit, self.rollout_term, self.rollout = parts
        # teacher-aligned prompt selection (`teacher_aligned_prompts`): the per-prompt scores of the original training
        # dataset (None when off) and the indices of its rows kept as `train_dataset`
        self.prompt_alignment: torch.Tensor | None = None
        self.aligned_prompt_indices: list[int] | None = None
        if args.teacher_aligned_prompts > 0:
            check_before_deepspeed("teacher_aligned_prompts", self._zero_stage())
            selection = select_aligned_prompts(
                self.train_dataset, args, source=self.source, has_images=self.has_images,
                tokenize_prompts=self._tokenize_prompts, model=self.model,
                policy=self.accelerator.unwrap_model(self.model), teacher=lambda: self.scorer.scoring_model("teacher"),
                pad_token_id=self._tokenizer.pad_token_id, eos_token_id=self.eos_token_ids,
                synced_gpus=self.accelerator.num_processes > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled),
            )  # fmt: skip
            self.train_dataset = selection.dataset
            self.prompt_alignment, self.aligned_prompt_indices = selection.scores, selection.keep

    # ----------------------------------------------------------------------------------------------- set-up
    def _enter_stage(self, step: int) -> None:
        """Make the plan of optimizer step `step` (1-based) active; with `stages`, log its index as `rlsd/stage` (it
        depends on the step alone, so every process switches at the same rollout)."""
        plan = self.stages.plan_for(step)
        if plan is not self.plan:
            logger.info("step %d: stage %s (credit=%r, distill_loss=%r)", step, plan.stage, plan.credit,
                        plan.distill_loss)  # fmt: skip
        self.plan = plan
        if plan.stage is not None:
            self._metrics["train"]["rlsd/stage"].append(float(plan.stage))

    def _zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage of this run, None without DeepSpeed."""
        return self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None

    def _on_teacher_step(self, global_step: int) -> None:
        """End of optimizer step `global_step`: let the teacher follow the policy and log whether it did."""
        synced = self.teacher.on_optimizer_step(global_step, self.accelerator.unwrap_model(self.model))
        self._metrics["train"]["rlsd/teacher_synced"].append(float(synced))

    # --------------------------------------------------------------------------------------------- rollout
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout and scoring, then the privileged context, the teacher pass and (B, T) token advantages
        (or, when they wait for the loss's forward, the `RLSDEntries` that let the loss compute them). A training
        rollout first enters the stage of the step it trains (`stages`)."""
        if self.model.training:
            self._enter_stage(self.state.global_step + 1)
        with self._handing_over("_rollout_tap", RolloutTap()) as tap:
            output = super()._generate_and_score_completions(inputs)
        return self.rollout.complete(inputs, output, tap, self.state.global_step + 1)

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any], completion_ids: list[Any]
    ) -> torch.Tensor:
        """TRL's rewards (gathered over processes); inside this trainer's rollout the prompts it used and the rewards'
        weighted totals are also handed to the rollout (`RolloutTap`)."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids)
        if self._rollout_tap is not None:
            self._rollout_tap.prompts = list(prompts)
            self._rollout_tap.rewards = self.rollout.reward_totals(rewards_per_func, self.reward_func_names)
        return rewards_per_func

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, *args):
        """TRL's tool loop, each row's tools watched by `rlsd.step.turns.ToolWatch` (faults and overlong results)."""
        watch = ToolWatch.over(self._sync_tool_dicts, self._async_tool_dicts, completions)
        result = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, *args)
        watch.check(prompt_ids, self._get_tool_suffix_ids, self.max_completion_length, self.model, self._metrics)
        return result

    # ------------------------------------------------------------------ public diagnostics (credit viewer, tests)
    def teacher_inputs(self, inputs, output, mode="train", rows=None, rollout=None) -> TeacherInputs:
        """`TeacherPrompts.build` under the active plan: the teacher prompts of a rollout's `rows`."""
        return self.prompts.build(inputs, output, mode, rows, rollout, distill=self.plan.distill_fn is not None)

    def teacher_scores(self, inputs, output, mode="train", rows=None, rollout=None) -> ScoreResult:
        """The teacher's log-probs (and entropy, when the rule reads it) of a rollout's completions, as the rollout's
        teacher pass computes them."""
        prompt_ids, prompt_mask, types, _ = self.teacher_inputs(inputs, output, mode, rows, rollout)
        entropy = "teacher_entropy" in self.plan.rule.needs
        return self.scorer.teacher_rows(output, prompt_ids, prompt_mask, types, rows, entropy=entropy)

    def score_rollout(self, which: str, output: dict[str, Any]) -> ScoreResult:
        """The log-probs of a rollout's completions after the student's own prompts under `which` ("student" or
        "reference"), with the rollout's vision inputs (the re-scoring passes)."""
        return self.scorer.rescore(which, output)

    def token_advantages(self, batch: dict[str, Any], student_logps: torch.Tensor, mode: str = "train") -> Tensor:
        """The (B, T) token advantages of a batch that carries deferred credit, given the student's log-probs (the
        loss's own computation)."""
        return self.credit.assign(self.plan.rule, RLSDEntries.from_batch(batch), batch, student_logps, mode)

    def _log_across_processes(self, mode: str, metrics: dict[str, float]) -> None:
        """`rlsd.step.metrics.reduce_metrics` into TRL's `_metrics`: the `log` callable every collaborator is
        handed."""
        reduce_metrics(self.accelerator, self._metrics, mode, metrics)

    # -------------------------------------------------------------------------------------------------- loss
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; when the credit waits for the student log-probs, they come from this forward, detached; with
        a distillation loss, the teacher runs once here (its hidden states also give the deferred credit its
        log-probs when `teacher_at_loss`) and the distillation term (and SDPG's anchor) from the same forward is
        added."""
        entries = RLSDEntries.from_batch(inputs)
        if not entries.deferred and self.plan.distill_fn is None and not entries.term:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered rollout batch stays untouched for later iterations
        rule_reads_pass = entries.deferred and entries.teacher_logps is None
        teacher = None
        if self.plan.distill_fn is not None:
            teacher, logps = self.scorer.teacher_hidden(inputs, entries, with_logps=rule_reads_pass)
            if rule_reads_pass:  # the rule's teacher log-probs, from the same pass
                entries.teacher_logps = logps
        mad = self.mad_teachers if teacher is not None else []
        others = [self.scorer.teacher_hidden(inputs, entries, owner)[0] for owner in mad]
        state = LossState(entries if entries.deferred else None, inputs)
        backbone, head = backbone_and_head(self.accelerator.unwrap_model(model))
        with (
            self._handing_over("_loss_state", state),
            captured_output(backbone if teacher is not None else None) as student_hidden,
        ):
            loss = super()._compute_loss(model, inputs)
        state.check_scored()
        if teacher is None:
            return loss + self.rollout_term.term(model, inputs, entries, state.logps)
        completion_length = inputs["completion_ids"].size(1)
        student = torch.cat(student_hidden)[:, -completion_length - 1 : -1]
        extra = self.distill_term.term(inputs, entries, self.plan, (student, head), teacher, state.logps, others)
        rollout = self.rollout_term.term(model, inputs, entries, state.logps)
        return self.plan.policy_loss_coef * loss + extra + rollout

    @contextlib.contextmanager
    def _handing_over(self, attribute: str, value: Any) -> Iterator[Any]:
        """Set `attribute` (`_rollout_tap` or `_loss_state`) to `value` while the TRL call inside the block runs."""
        setattr(self, attribute, value)
        try:
            yield value
        finally:
            setattr(self, attribute, None)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring forward; the first one inside the loss also hands its log-probs to the loss state and turns
        the pending credit into (B, T) advantages."""
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        state, self._loss_state = self._loss_state, None
        if state is not None:
            state.logps = logps
            if state.pending is not None:
                mode = "train" if self.model.training else "eval"
                student = state.batch.get("old_per_token_logps")
                student = logps.detach() if student is None else student
                rule = self.plan.rule
                state.batch["advantages"] = self.credit.assign(rule, state.pending, state.batch, student, mode)
        return logps, entropies, aux_loss

    # ---------------------------------------------------------------------------------------- non-finite guards
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """TRL's loss; in training a NaN or inf loss stops the run here, before its backward pass, the optimizer
        step or any save, naming the step and the batch entries that are not finite."""
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.model.training and not self.args.fp16:
            fix = nonfinite_fix(self.args, RLSDConfig)
            check_finite_loss(loss[0] if isinstance(loss, tuple) else loss, inputs, self.state.global_step + 1, fix)
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """HF's gradient norm (computed before every optimizer step); a NaN or inf one stops the run before the
        optimizer applies it, naming the step and the first parameter whose gradient is not finite (with fp16, the
        loss scaler skips such steps itself)."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.args.fp16:
            check_finite_grad_norm(norm, model, self.state.global_step + 1, nonfinite_fix(self.args, RLSDConfig))
        return norm

    # ------------------------------------------------------------------------------------------- checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """TRL's training loop; a checkpoint to resume from is verified first, file by file (`rlsd.infra.checkpoint`);
        SIGTERM saves a checkpoint after the step and raises `Preempted`, exit 143 (`rlsd.infra.preemption`)."""
        expected = checkpoint_files.hf_state_files(self.args, self.is_deepspeed_enabled or self.is_fsdp_enabled)
        expected += checkpoint_files.rlsd_state_files(self.teacher, self.rule_state, self.source)
        self._resume = checkpoint_files.resume_plan(
            resume_from_checkpoint, self.args.output_dir, expected=expected,
            weights_only=self.args.resume_weights_only, log_to=logger if self.accelerator.is_main_process else None,
        )  # fmt: skip
        with preemption.stop_on_sigterm(self.add_callback, self.remove_callback, self.accelerator):
            return super().train(resume_from_checkpoint=self._resume.checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial):
        """`_write_checkpoint` staged, sealed and renamed into place (`rlsd.infra.checkpoint.staged`: a killed save
        leaves no `checkpoint-N` that looks complete), then HF's rotation."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with checkpoint_files.staged(
            run_dir, name, self.state.global_step, should_save=self.args.should_save,
            barrier=self.accelerator.wait_for_everyone,
            before_seal=lambda root: checkpoint_files.unstage_best(self.state, root, run_dir, name),
        ) as root, self._handing_over("_staging_root", root):  # fmt: skip
            self._write_checkpoint(model, trial)  # HF and TRL write (and rotate) inside the staging folder
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial: Any = None) -> str:
        """HF's run folder, or the staging folder while `_save_checkpoint` writes a checkpoint (`_staging_root`), so
        that HF and TRL write and rotate inside it."""
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _write_checkpoint(self, model, trial):
        """TRL's checkpoint plus RLSD's files: the teacher's weights and sync state, the rule's state."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        checkpoint_files.save_rlsd_state(folder, self.teacher, self.rule_state, self.accelerator.unwrap_model,
                                         write=self.args.should_save, source=self.source)  # fmt: skip

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resuming restores the teacher and the rule state together with the optimizer (verified before by `train`,
        whose `_resume` names what a weights-only resume starts fresh: a missing teacher restarts from the policy)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        checkpoint_files.load_rlsd_state(
            checkpoint, self.teacher, self.rule_state, fresh=self._resume.fresh,
            policy=self.accelerator.unwrap_model(self.model), unwrap=self.accelerator.unwrap_model, source=self.source,
        )  # fmt: skip
