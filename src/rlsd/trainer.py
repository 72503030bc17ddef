"""`RLSDTrainer`: TRL's `GRPOTrainer` with token-level credit from a privileged self-teacher.

The trainer only gathers log-probs and hands (B, T) token advantages to TRL's own loss:
1. after TRL's rollout and scoring, the privileged source (`rlsd.privileged`) fills the teacher template of each
   row and one no-grad teacher pass (`_score`, the one scorer) scores [teacher prompt ; completion];
2. the student's sampled-token log-probs are TRL's old log-probs when TRL computes them, else the detached
   log-probs of the loss's own forward (no extra pass);
3. a credit rule (`rlsd.rules`) turns (A_i, teacher, student, mask, ...) into A_it.
With a distillation loss (`distill_loss`), the teacher runs once, at loss time: its last hidden states feed the
distillation term (`rlsd.distill`, a chunk of tokens at a time) and, when the rule needs nothing else from the
rollout, the rule's teacher log-probs; the student's hidden states are captured from the loss's own forward.
Vision-language models: the teacher prompt keeps the image blocks and every forward gets the rollout's vision
tensors (`rlsd.vision`). What travels from rollout to loss is `rlsd.batch.RLSDEntries`. With `stages` (Sparse-to-Dense,
`rlsd.stages`) each training rollout first enters the stage of its step (rule and loss rebuilt); with
`mad_opd_teachers` (MAD-OPD) every teacher runs the loss-time pass and the term is their confidence-weighted sum.
With `teacher_rollout_loss` (BRTS, PBSD) the teacher also generates completions after TRL's rollout, and the loss adds
a term on those trajectories (`rlsd.rollout_term.TeacherRolloutTerm`, the math in
`rlsd.teacher_rollouts`). With `teacher_aligned_prompts` the training prompts are ranked by student-teacher agreement
at construction and the most aligned kept (`rlsd.aligned_prompts`, the math in `rlsd.prompt_selection`).

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
  `add_fused_lm_head`. Guarded by `test_teacher_logps_align_with_a_direct_forward`,
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
- `generation_config` (read): TRL's `GenerationConfig` of transformers generation (max_completion_length,
  temperature, top_p, top_k, ...); the teacher's rollouts (`teacher_rollout_loss`) sample with it. Guarded by
  `test_teacher_generation_follows_the_run_generation_config`.
- `temperature` (read): sampling temperature that divides the logits in every scoring forward. Guarded by
  `test_teacher_logps_align_with_a_direct_forward`.
- `reward_weights` (read): weights of the reward functions in the total. Guarded by
  `test_sibling_context_shows_a_successful_sibling_and_rows_without_one_get_no_signal`.
- `tools`, `environment_factories`, `rollout_func` (read): None / empty when unused. Guarded by
  `test_image_column_with_a_rollout_function_is_refused_with_a_teacher`,
  `test_environments_and_rollout_functions_are_refused_with_a_teacher`.
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
- `_save_checkpoint`, `_get_output_dir` (override, replaced): HF writes a checkpoint (and rotates) under
  `_get_output_dir(trial)`. Guarded by
  `test_kill_while_writing_a_checkpoint_then_resume_exactly_from_the_previous_one`.
- `_load_optimizer_and_scheduler` (override): called once when resuming, after the weights are loaded. Guarded by
  `test_resume_restores_the_synced_teacher_and_continues_exactly`.
- `train` (override): HF's public loop; the checkpoint is verified first. Guarded by
  `test_damaged_checkpoint_is_refused_naming_the_file`.
- `train_dataset` (assigned): replaced after construction by the rows `teacher_aligned_prompts` keeps
  (`rlsd.aligned_prompts`); TRL's dataloader reads it in `get_train_dataloader` / `_get_train_sampler` when training
  starts. Guarded by `test_a_trainer_keeps_the_prompts_the_pure_function_ranks_highest`.
- `add_fused_lm_head`, `use_adapter`, `SyncRefModelCallback`, `create_model_from_path`, `prepare_deepspeed`,
  `prepare_fsdp`, `disable_gradient_checkpointing`, `prepare_multimodal_messages`, `pad` (TRL helpers called, the
  first four by `rlsd.teacher`): the fused log-prob head and its `outputs`, adapter switching, the weight copy / EMA
  of the reference model, loading a model by name or path as TRL loads its reference model (the external teacher,
  `dtype` strings and device_map included), frozen-model placement, image blocks placed as the rollout places them,
  left padding. Guarded by
  `test_copy_teacher_with_fp32_head_scores_exactly_like_the_policy`,
  `test_a_live_teacher_asks_the_fused_head_only_for_what_the_rule_reads`,
  `test_peft_synced_teacher_scores_like_the_policy_after_a_sync`, `test_ema_teacher_follows_the_policy_by_its_decay`,
  `test_teacher_prompt_keeps_image_blocks_and_rewrites_the_last_text`,
  `test_external_teacher_logps_equal_a_direct_forward_of_the_external_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from accelerate.utils import gather_object
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import pad

from rlsd import checkpoint as checkpoint_files
from rlsd import vision
from rlsd.aligned_prompts import select_aligned_prompts
from rlsd.batch import RLSDEntries, loss_mask, scalar
from rlsd.config import RLSDConfig
from rlsd.credit import TokenMean, grpo_advantages, rlsd_lambda, think_span_mask
from rlsd.distill import (
    OverlapProbe,
    sdpg_ref_penalty,
    selected_mad_opd_loss,
    selected_token_loss,
    token_loss_fn,
)
from rlsd.generation import generate_texts
from rlsd.guards import check_before_deepspeed, check_no_attention_dropout, check_plain_lm_head
from rlsd.metrics import reduce_metrics
from rlsd.privileged import RolloutView, get_source, validate_teacher_template
from rlsd.rewards import guard_reward, reward_totals
from rlsd.rollout_term import NoTeacherRollouts, TeacherRolloutTerm
from rlsd.rules import RuleParams, Signals, get_rule, rule_params
from rlsd.scoring import ScoreResult, score_tokens
from rlsd.stages import STAGE_FIELDS, reachable, stage_index, stage_values
from rlsd.teacher import (
    TEACHER_STATE_FILE,
    TEACHER_WEIGHTS_FILE,
    ExternalTeacher,
    Teacher,
    TeacherBuild,
    TeacherSyncCallback,
    backbone_and_head,
    build_teachers,
    get_teacher_kind,
)
from rlsd.teacher_prompt import has_image_blocks, render_teacher_prompts
from rlsd.transforms import get_transform
from rlsd.validate import CheckpointError, NonFiniteError

logger = logging.getLogger(__name__)
RULE_STATE_FILE = "rlsd_rule_state.json"


class RLSDTrainer(GRPOTrainer):
    """GRPO with RLSD token credit (arXiv 2604.03128); with `credit="grpo"` it is TRL's `GRPOTrainer`.

    Takes the arguments of `GRPOTrainer`. The training dataset needs the privileged column
    (`args.privileged_column`) whenever the credit rule uses the teacher.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "rlsd"]
    _name = "RLSD"

    def __init__(self, model: Any, reward_funcs: Any, args: RLSDConfig | None = None, **kwargs: Any) -> None:
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = RLSDConfig(output_dir=f"{model_name.split('/')[-1]}-RLSD")
        if not isinstance(args, RLSDConfig):
            raise TypeError(f"RLSDTrainer needs an RLSDConfig, got {type(args).__name__}")
        validate_teacher_template(args.teacher_template, args.privileged_source)
        # Sparse-to-Dense stages (`rlsd.stages`): the fields of the active stage are set on `args`; what is built once
        # (the teacher, SDPG's reference, the checks) is built when any stage that can run needs it
        self._stage_base = {name: getattr(args, name) for name in STAGE_FIELDS}
        self.stage: int | None = None
        runs = [self._stage_base]
        if args.stages:
            runs = [stage_values(args.stages, index, self._stage_base) for index in reachable(args.stages)]
            self.stage = stage_index(args.stages, 1)
            _set_fields(args, stage_values(args.stages, self.stage, self._stage_base))
        self._set_credit_and_loss(args)
        run_rules = [get_rule(values["credit"]) for values in runs]
        self.any_distill = any(values["distill_loss"] != "none" for values in runs)
        self.uses_teacher = self.any_distill or any("teacher_logps" in rule.needs for rule in run_rules)
        self.uses_teacher = self.uses_teacher or args.teacher_rollout_loss != "none"  # the teacher generates
        self.teacher_entropy = any("teacher_entropy" in rule.needs for rule in run_rules)
        self.any_sdpg_reference = args.sdpg_ref_coef > 0 and any(values["distill_loss"] == "sdpg" for values in runs)
        self.source = get_source(args.privileged_source)(args)
        if self.uses_teacher:
            for split_name in ("train_dataset", "eval_dataset"):
                self.source.check_dataset(kwargs.get(split_name), split_name)
        if self.uses_teacher and not args.disable_dropout:
            # the teacher scores in eval mode; dropout in the student's train-mode forward would enter Delta
            logger.info("a self-teacher is used: setting disable_dropout=True (TRL then zeroes every nn.Dropout)")
            args.disable_dropout = True
        super().__init__(model, _guard_rewards(reward_funcs, args.reward_timeout), args=args, **kwargs)
        self.has_images = any(vision.image_dataset(kwargs.get(split)) for split in ("train_dataset", "eval_dataset"))
        if self.uses_teacher:
            self._check_vision_supported(kwargs)
            self._check_rollout_supported()
        if args.teacher_rollout_loss != "none":
            TeacherRolloutTerm.check_supported(
                args, self.accelerator.unwrap_model(self.model), kwargs, images=self.has_images,
                tools=bool(self.tools), fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled,
            )  # fmt: skip
        if self._is_vlm:  # the row-subset teacher pass would have to slice the vision tensors: every row is scored
            self.skips_known_credit = False

        self._loss_state: LossState | None = None  # set by `_compute_loss` for the next scoring forward
        self._rollout_tap: RolloutTap | None = None  # open while TRL's rollout runs: `_calculate_rewards` fills it
        self.rule_state = self.rule.state.from_params(rule_params(args)) if self.rule.state else None
        if self.any_distill:
            check_plain_lm_head(self.accelerator.unwrap_model(self.model), "distill_loss")
            if self._zero_stage() == 3:
                raise NotImplementedError(
                    "distill_loss projects the captured hidden states through the LM head after the forward, which "
                    "ZeRO-3 has re-partitioned; use FSDP2 or ZeRO-2, or a token-advantage rule (credit=...)"
                )
        if self.uses_teacher:
            check_no_attention_dropout(self.accelerator.unwrap_model(self.model))
        # the teacher of kind `args.teacher`, MAD-OPD's further teachers and SDPG's anchor, placed like TRL's reference
        columns = ("prompt", *((args.privileged_column,) if "answer" in self.source.fills else ()))
        build = TeacherBuild(
            args, self.accelerator.unwrap_model(self.model), tokenizer=self._tokenizer,
            dataset=kwargs.get("train_dataset"), text_columns=columns, temperature=self.temperature,
            with_entropy=self.teacher_entropy, distill=self.any_distill,
        )  # fmt: skip
        teachers = build_teachers(
            build, self._prepare_frozen_model, uses_teacher=self.uses_teacher, sdpg_reference=self.any_sdpg_reference
        )
        self.teacher: Teacher | None = teachers.teacher
        self.mad_teachers: list[Teacher] = teachers.mad
        self.reference: Teacher | None = teachers.reference
        if self.teacher is not None and get_teacher_kind(args.teacher).follows_policy:
            self.add_callback(TeacherSyncCallback(self))
        # collaborators: each is handed the values and callables it reads, never the trainer
        # <collaborators>
        # teacher rollouts (`teacher_rollout_loss`, BRTS / PBSD): a term handed what it reads, never the trainer
        self.rollout_term: TeacherRolloutTerm | NoTeacherRollouts = NoTeacherRollouts()
        if args.teacher_rollout_loss != "none":
            self.rollout_term = TeacherRolloutTerm(
                accelerator=self.accelerator, args=args, source=self.source, tokenizer=self._tokenizer,
                generation_config=self.generation_config, eos_token_ids=self.eos_token_ids,
                temperature=self.temperature, reward_weights=self.reward_weights,
                tokenize_prompts=self._tokenize_prompts, teacher_inputs=self.teacher_inputs,
                scoring_model=self._scoring_model, score=self._score,
                trl_logps=functools.partial(GRPOTrainer._get_per_token_logps_and_entropies, self),
                trl_rewards=functools.partial(GRPOTrainer._calculate_rewards, self),
                log=self._log_across_processes, group_size=self._group_size,
                scoring_batch_size=self._scoring_batch_size, training=lambda: self.model.training,
                accumulation=lambda: self.current_gradient_accumulation_steps,
            )  # fmt: skip
        # teacher-aligned prompt selection (`teacher_aligned_prompts`): the per-prompt scores of the original training
        # dataset (None when off) and the indices of its rows kept as `train_dataset`
        self.prompt_alignment: torch.Tensor | None = None
        self.aligned_prompt_indices: list[int] | None = None
        if args.teacher_aligned_prompts > 0:
            check_before_deepspeed("teacher_aligned_prompts", self._zero_stage())
            selection = select_aligned_prompts(
                self.train_dataset, args, source=self.source, has_images=self.has_images,
                tokenize_prompts=self._tokenize_prompts, model=self.model,
                policy=self.accelerator.unwrap_model(self.model), teacher=lambda: self._scoring_model("teacher"),
                pad_token_id=self._tokenizer.pad_token_id, eos_token_id=self.eos_token_ids,
                synced_gpus=self.accelerator.num_processes > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled),
            )  # fmt: skip
            self.train_dataset = selection.dataset
            self.prompt_alignment, self.aligned_prompt_indices = selection.scores, selection.keep

    # ----------------------------------------------------------------------------------------------- set-up
    def _set_credit_and_loss(self, args: RLSDConfig) -> None:
        """The credit rule and distillation loss of `args` (of the active stage), and how the rollout serves them."""
        self.rule = get_rule(args.credit)
        self.rule_uses_teacher = "teacher_logps" in self.rule.needs
        self.distill_fn = None if args.distill_loss == "none" else token_loss_fn(args.distill_loss, args)
        # a multiplicative rule gives A_it = 0 on rows with A_i = 0 whatever the teacher says: unless a distillation
        # term needs the teacher there too, those rows are neither rendered nor scored by the teacher
        self.skips_known_credit = self.rule.multiplicative and self.distill_fn is None
        # with a distillation loss the teacher runs at loss time; a rule that needs nothing else from the rollout
        # (no group statistics, entropy or state) takes its teacher log-probs from that same pass
        self.teacher_at_loss = (
            self.distill_fn is not None
            and self.rule_uses_teacher
            and not {"group_ids", "teacher_entropy"} & self.rule.needs
            and self.rule.state is None
        )

    def _enter_stage(self, step: int) -> None:
        """Sparse-to-Dense: make the stage of optimizer step `step` (1-based) active, its fields set on `self.args`
        and the rule and the distillation loss rebuilt, and log its index as `rlsd/stage`; it depends on the step
        alone, so every process switches at the same rollout. Nothing happens without `stages`."""
        stages = self.args.stages
        if not stages:
            return
        index = stage_index(stages, step)
        if index != self.stage:
            self.stage = index
            _set_fields(self.args, stage_values(stages, index, self._stage_base))
            self._set_credit_and_loss(self.args)
            if self._is_vlm:
                self.skips_known_credit = False
            logger.info("step %d: stage %d (credit=%r, distill_loss=%r)", step, index, self.args.credit,
                        self.args.distill_loss)  # fmt: skip
        self._metrics["train"]["rlsd/stage"].append(float(index))

    def _check_vision_supported(self, kwargs: dict[str, Any]) -> None:
        """With a teacher, images are supported from an `image`/`images` column (the prompts may hold TRL's empty
        image placeholders) with a processor and single-turn rollouts; image blocks in the prompts of a dataset without
        an image column, a plain tokenizer, tools, environments or a rollout function are refused (the teacher, or
        TRL's own scoring, would not see the images)."""
        for split_name in ("train_dataset", "eval_dataset"):
            split = kwargs.get(split_name)
            if vision.prompts_hold_images(split) and not vision.image_dataset(split):
                raise ValueError(vision.IMAGE_BLOCKS_ERROR.format(where=split_name))
        if not self.has_images:
            return
        what = vision.teacher_use(self.args)
        if not self._is_vlm:
            raise ValueError(vision.TOKENIZER_WITH_IMAGES_ERROR.format(what=what))
        used = {
            "tools": bool(self.tools),
            "environment_factory": self.environment_factories is not None,
            "rollout_func": self.rollout_func is not None,
        }
        unsupported = [name for name, on in used.items() if on]
        if unsupported:
            raise NotImplementedError(
                f"images with {' and '.join(unsupported)} and {what}: the teacher's prompt is rebuilt from the "
                "dataset row and would miss the images or observations added during the rollout; use credit='grpo' "
                "and distill_loss='none' for this run, or drop the image column"
            )

    def _check_rollout_supported(self) -> None:
        """The teacher prompt is rebuilt from the dataset row: environments and rollout functions, whose student
        prompts differ from it, are refused."""
        used = [name for name, on in (("environment_factory", self.environment_factories is not None),
                                      ("rollout_func", self.rollout_func is not None)) if on]  # fmt: skip
        if used:
            raise NotImplementedError(
                f"{' and '.join(used)} with {vision.teacher_use(self.args)}: the teacher's prompt is rebuilt from the "
                "dataset row and would miss what the rollout added to the student's prompt (environment observations, "
                "a custom format); use credit='grpo' and distill_loss='none' with these options"
            )

    def _zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage of this run, None without DeepSpeed."""
        return self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None

    def _prepare_frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place a no-grad copy the way TRL places its reference model (DeepSpeed, FSDP or plain device): the `place`
        callable of `build_teachers`."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _on_teacher_step(self, global_step: int) -> None:
        """End of optimizer step `global_step`: let the teacher follow the policy and log whether it did."""
        synced = self.teacher.on_optimizer_step(global_step, self.accelerator.unwrap_model(self.model))
        self._metrics["train"]["rlsd/teacher_synced"].append(float(synced))

    # --------------------------------------------------------------------------------------------- rollout
    def _current_lambda(self) -> float:
        """lam_k for the optimizer step this rollout batch trains (k = completed steps + 1)."""
        args = self.args
        return rlsd_lambda(
            self.state.global_step + 1,
            lam0=args.rlsd_lambda,
            warmup_steps=args.rlsd_lambda_warmup_steps,
            decay_steps=args.rlsd_lambda_decay_steps,
        )

    def _teacher_pass_needed(self, lam: float) -> bool:
        """The rule's teacher pass is skipped when the rule ignores the teacher, or when its multiplier is
        identically 1 (lam = 0 or eps_w = 0 for the rules that reduce to GRPO there)."""
        if not self.rule_uses_teacher:
            return False
        if self.rule.grpo_when_lambda_zero:
            return lam > 0.0 and self.args.rlsd_clip > 0.0
        return True

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout and scoring, then the privileged context, the teacher pass and (B, T) token advantages
        (or, when they wait for the loss's forward, the `RLSDEntries` that let the loss compute them). A training
        rollout first enters the stage of the step it trains (`stages`)."""
        if self.model.training:
            self._enter_stage(self.state.global_step + 1)
        self._rollout_tap = tap = RolloutTap()
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_tap = None
        mode = "train" if self.model.training else "eval"
        mask = loss_mask(output)
        lam = self._current_lambda() if self.rule_uses_teacher else 0.0
        if self.rule_uses_teacher:
            self._metrics[mode]["rlsd/lambda"].append(lam)
        rule_pass = self._teacher_pass_needed(lam)
        entries = RLSDEntries()
        rows = self._teacher_rows(output["advantages"]) if self.skips_known_credit and rule_pass else None
        if rule_pass or self.distill_fn is not None:
            teacher = self.teacher_inputs(inputs, output, mode, rows, tap)
            prompt_ids, prompt_mask, types, entries.has_context = teacher
            if self.distill_fn is not None:  # the loss-time teacher pass needs the teacher's prompt
                entries.teacher_prompt_ids, entries.teacher_prompt_mask = prompt_ids, prompt_mask
                entries.teacher_types = types
                weight = entries.has_context.float()
                if self.args.distill_positive_only:
                    weight = weight * (output["advantages"] > 0).float()
                entries.distill_weight = weight
        if self.reference is not None and self.args.distill_loss == "sdpg":
            entries.ref_logps = self.score_rollout("reference", output).logps
        if not rule_pass:
            output["advantages"], _ = grpo_advantages(output["advantages"], mask)
            if self.rule_uses_teacher:
                self._metrics[mode]["rlsd/teacher_time_s"].append(0.0)
            self.rollout_term.add(inputs, output, entries, mode)
            return {**output, **entries.to_batch()}

        entries.seq_advantages = output["advantages"]
        entries.lam = scalar(lam)
        pass_logps = None
        # the loss-time teacher pass may give the rule its log-probs only when the student's log-probs also come from
        # the loss's own forward: with TRL's old log-probs (rollout-time weights) the teacher is scored now, so that
        # tau and s are taken from the same weights
        at_loss = self.teacher_at_loss and output.get("old_per_token_logps") is None
        if not at_loss:
            start = time.perf_counter()
            scores = self._score_teacher_rows(output, prompt_ids, prompt_mask, types, rows)
            self._metrics[mode]["rlsd/teacher_time_s"].append(time.perf_counter() - start)
            entries.teacher_logps, entries.teacher_entropy = scores.logps, scores.entropy
            pass_logps = scores.logps if rows is None else None  # PBSD's log pi_T(y- | x_T), when every row has it
            if rows is not None:  # the rule scores only the rows with A_i != 0; the others keep A_it = 0
                entries.scored = output["advantages"] != 0
            entries.state_values = {key: scalar(v) for key, v in self._rule_state_values(entries, mask, mode).items()}
        self.rollout_term.add(inputs, output, entries, mode, pass_logps)
        student_logps = output.get("old_per_token_logps")
        if student_logps is None and "group_ids" in self.rule.needs:  # group statistics need the whole group now
            student_logps = self.score_rollout("student", output).logps
        if student_logps is not None and not at_loss:  # the credit is final at rollout time
            output["advantages"] = self._token_advantages(entries, output, student_logps, mode)
            entries.seq_advantages = entries.teacher_logps = entries.teacher_entropy = entries.scored = None
            entries.lam, entries.state_values = None, {}
        return {**output, **entries.to_batch()}

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any], completion_ids: list[Any]
    ) -> torch.Tensor:
        """TRL's rewards (gathered over processes); inside this trainer's rollout the prompts it used and the rewards'
        weighted totals are also handed to the rollout (`RolloutTap`)."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids)
        if self._rollout_tap is not None:
            self._rollout_tap.prompts = list(prompts)
            self._rollout_tap.rewards = reward_totals(rewards_per_func, self.reward_weights)
        return rewards_per_func

    def _rule_state_values(self, entries: RLSDEntries, mask: torch.Tensor, mode: str) -> dict[str, float]:
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

    def _teacher_rows(self, seq_advantages: torch.Tensor) -> torch.Tensor:
        """Indices of the rows the teacher scores under a multiplicative rule: those with A_i != 0 in batch order,
        topped up with rows of known credit to the largest such count over processes, so that every process runs
        the same number of forward chunks (a sharded model gathers its parameters collectively in each)."""
        scored = seq_advantages != 0
        count = scored.sum().reshape(1)
        target = int(self.accelerator.gather(count).max().item())
        order = torch.cat([scored.nonzero().flatten(), (~scored).nonzero().flatten()])
        return order[:target]

    def teacher_inputs(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        mode: str = "train",
        rows: torch.Tensor | None = None,
        rollout: RolloutTap | None = None,
    ) -> TeacherInputs:
        """The teacher prompts of `rows` (all rows when None) from the privileged source, tokenized and left-padded
        (ids, mask, token types for vision models), and which of all the rows have privileged context. Rows outside
        `rows` are neither rendered nor tokenized. The teacher's prompt is built from the prompt the rollout used
        (`rollout.prompts`; the dataset rows' without it), and a source that reads rewards gets `rollout.rewards`
        (public for diagnostics and tests)."""
        rollout = rollout or RolloutTap()
        selected = list(range(len(inputs))) if rows is None else rows.tolist()
        context = self.source.context(self._rollout_view(inputs, output, mode, rollout.rewards), selected)
        self._log_across_processes(mode, context.metrics)
        device = self.accelerator.device
        has_context = torch.ones(len(inputs), dtype=torch.bool, device=device)
        has_context[selected] = torch.tensor(context.has_context, dtype=torch.bool, device=device)
        images = vision.batch_images(inputs)
        # the prompt the rollout used (an environment's observation included); with images, the dataset row's, whose
        # image blocks are placed below as TRL places them (the rollout's carry the student's image payloads)
        used = rollout.prompts if rollout.prompts is not None and images is None else [row["prompt"] for row in inputs]
        prompts = [used[i] for i in selected]
        if images is None and any(has_image_blocks(prompt) for prompt in prompts):
            raise ValueError(vision.IMAGE_BLOCKS_ERROR.format(where="a rollout batch"))
        if images is not None and not self._is_vlm:
            raise ValueError(vision.TOKENIZER_WITH_IMAGES_ERROR.format(what=vision.teacher_use(self.args)))
        row_images = [images[i] for i in selected] if images is not None else [None] * len(selected)
        if self.args.teacher_transform is not None:  # what the teacher sees instead of the student's input
            prompts, row_images = self._transformed(prompts, row_images)
        if images is not None:  # the prompts TRL rolled out: image blocks placed as TRL places them
            prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, row_images, strict=True)]
        teacher_prompts = render_teacher_prompts(prompts, self.args.teacher_template, context.fields)
        if not teacher_prompts:  # no row needs the teacher
            empty = torch.zeros(0, 0, dtype=torch.long, device=device)
            return TeacherInputs(empty, empty, {}, has_context)
        prompt_ids_list, _, fields = self._tokenize_prompts(teacher_prompts)
        pad_id = self._tokenizer.pad_token_id
        prompt_ids = pad([torch.tensor(ids) for ids in prompt_ids_list], padding_value=pad_id, padding_side="left")
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids_list], padding_value=0,
                          padding_side="left")  # fmt: skip
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        types = self._teacher_token_types(fields, prompt_ids, output) if images is not None else {}
        if images is not None and self.args.teacher_transform is not None:  # the teacher's own images, processed
            flat = [image for row in row_images if row for image in row]  # as TRL processes the student's
            processed = self.processing_class.image_processor(images=flat, return_tensors="pt")
            types.update({key: value.to(device) for key, value in processed.items() if key in vision.IMAGE_KEYS})
        return TeacherInputs(prompt_ids, prompt_mask, types, has_context)

    def _transformed(self, prompts: list[Any], images: list[Any]) -> tuple[list[Any], list[Any]]:
        """Each row's prompt and images after `teacher_transform`; images changed for a loss-time teacher pass (whose
        inputs TRL would have to split by rows) are refused."""
        transform = get_transform(self.args.teacher_transform)
        pairs = [transform(prompt, row) for prompt, row in zip(prompts, images, strict=True)]
        new_images = [row for _, row in pairs]
        if self.distill_fn is not None and any(row is not None for row in new_images):
            raise NotImplementedError(
                f"teacher_transform={self.args.teacher_transform!r} on images with distill_loss: the loss-time "
                "teacher pass reads the student's images; use a token-advantage rule (credit=...) with this transform"
            )
        return [prompt for prompt, _ in pairs], new_images

    def teacher_scores(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        mode: str = "train",
        rows: torch.Tensor | None = None,
        rollout: RolloutTap | None = None,
    ) -> ScoreResult:
        """The teacher's log-probs (and entropy, when the rule reads it) of a rollout's completions: the privileged
        context of `inputs`, the teacher prompts and one scoring pass, as the rollout computes them (public for
        diagnostics such as the credit viewer, and for tests)."""
        prompt_ids, prompt_mask, types, _ = self.teacher_inputs(inputs, output, mode, rows, rollout)
        return self._score_teacher_rows(output, prompt_ids, prompt_mask, types, rows)

    def score_rollout(self, which: str, output: dict[str, Any]) -> ScoreResult:
        """The log-probs of a rollout's completions after the student's own prompts under `which` ("student" or
        "reference"), with the rollout's vision inputs: the re-scoring passes (public for diagnostics and tests)."""
        return self._score(which, output["prompt_ids"], output["prompt_mask"], output,
                           vision.student_vision_kwargs(output))  # fmt: skip

    def token_advantages(
        self, batch: dict[str, Any], student_logps: torch.Tensor, mode: str = "train"
    ) -> torch.Tensor:
        """The (B, T) token advantages of a batch that carries deferred credit (`rlsd_*` entries), given the
        student's log-probs (public for diagnostics and tests; the loss calls the same code)."""
        return self._token_advantages(RLSDEntries.from_batch(batch), batch, student_logps, mode)

    def _rollout_view(
        self, inputs: list[dict[str, Any]], output: dict[str, Any], mode: str, rewards: torch.Tensor | None
    ) -> RolloutView:
        """What the privileged source may read; completion texts and rewards are gathered over processes only for
        a source that reads them (a collective: every process builds the view for the same batches)."""
        group_size = self._group_size()
        generate = self._text_generator if self.source.needs_generator else None
        if not self.source.needs_completions:
            return RolloutView(inputs, group_size, generate=generate)
        ids, keep = output["completion_ids"], output["completion_mask"]
        texts = self._tokenizer.batch_decode(
            [row[mask.bool()] for row, mask in zip(ids, keep, strict=True)], skip_special_tokens=True
        )
        offset = self.accelerator.process_index * len(texts)
        if rewards is None:
            raise ValueError(f"privileged_source={self.args.privileged_source!r} reads the rollout's rewards: pass "
                             "the weighted totals (`rewards`) with the rollout")  # fmt: skip
        return RolloutView(inputs, group_size, offset, gather_object(texts), rewards.tolist(), generate)

    def _text_generator(self, prompts: list[Any], model: str = "policy") -> list[str]:
        """`RolloutView.generate`: complete `prompts` with the policy's or the teacher's current weights, in eval mode
        and without gradient checkpointing, under the run's generation config."""
        which = "teacher" if model == "teacher" else "student"
        with self._scoring_model(which) as module:
            unwrapped = self.accelerator.unwrap_model(module)
            training = unwrapped.training
            unwrapped.eval()
            try:
                return generate_texts(
                    unwrapped, prompts, tokenize_prompts=self._tokenize_prompts,
                    pad_token_id=self._tokenizer.pad_token_id,
                    decode=lambda rows: self._tokenizer.batch_decode(rows, skip_special_tokens=True),
                    generation_config=self.generation_config, eos_token_ids=self.eos_token_ids,
                    synced_gpus=self.is_fsdp_enabled or self.is_deepspeed_enabled,
                )  # fmt: skip
            finally:
                unwrapped.train(training)

    def _teacher_token_types(
        self, fields: dict[str, Any], prompt_ids: torch.Tensor, output: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The processor's token-type ids of the teacher prompts (left-padded like the ids), after checking that
        each teacher prompt holds as many image tokens as the student's."""
        pad_id = self._image_pad_token_id
        if pad_id is not None:
            teacher_count = (prompt_ids == pad_id).sum(1)
            student_count = ((output["prompt_ids"] == pad_id) & output["prompt_mask"].bool()).sum(1)
            if not torch.equal(teacher_count, student_count):
                raise RuntimeError(
                    f"the teacher prompts hold {teacher_count.tolist()} image tokens per row but the student's hold "
                    f"{student_count.tolist()}: the teacher would not see the same images; check the chat template"
                )
        types = {}
        for key in vision.TOKEN_TYPE_KEYS:
            if key in fields:
                rows = [torch.as_tensor(row, dtype=torch.long) for row in fields[key]]
                types[key] = pad(rows, padding_value=0, padding_side="left").to(prompt_ids.device)
        return types

    # --------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _score(
        self,
        which: str,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        batch: dict[str, Any],
        model_kwargs: dict[str, Any],
        *,
        entropy: bool = False,
        rows: torch.Tensor | None = None,
    ) -> ScoreResult:
        """The one no-grad scoring forward: log-probs (and entropy) of the completion tokens of `batch` (its rows
        `rows`, when given) after `prompt_ids`, under the teacher, SDPG's reference or the student (`which`), chunked
        by TRL's per-device batch. Text rows sharing a teacher prompt within a group compute it once
        (`rlsd.scoring.score_tokens`, when `teacher_prefix_sharing`)."""
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        if rows is not None:
            completion_ids, completion_mask = completion_ids[rows], completion_mask[rows]
        with self._scoring_model(which) as model:
            if which == "teacher" and self._shares_prefixes(model_kwargs, rows, batch["completion_ids"].size(0)):
                with self.accelerator.autocast():  # as TRL's scoring forward: same precision as the plain pass
                    return score_tokens(
                        self.accelerator.unwrap_model(model), prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=self.temperature, batch_size=self._scoring_batch_size(), with_entropy=entropy,
                        group_size=self._group_size(), fused_head=True,
                    )  # fmt: skip
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self, model, input_ids, attention_mask, completion_ids.size(1),
                batch_size=self._scoring_batch_size(), compute_entropy=entropy, **model_kwargs,
            )  # fmt: skip
        return ScoreResult(logps, entropies if entropy else None)

    @contextlib.contextmanager
    def _scoring_model(self, which: str, owner: Any = None) -> Iterator[torch.nn.Module]:
        """The module that scores for `which`: the teacher's (or `owner`'s, one of MAD-OPD's teachers) or the
        reference's weights (a copy, an adapter, or the policy itself) with gradient checkpointing off, or the
        student."""
        if which == "student":
            yield self.model
            return
        owner = owner or (self.teacher if which == "teacher" else self.reference)
        policy = self.accelerator.unwrap_model(self.model)
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            owner.forward_context(self.model, policy) as model,
        ):
            yield model

    def _shares_prefixes(self, model_kwargs: dict[str, Any], rows: torch.Tensor | None, local_rows: int) -> bool:
        """Prefix sharing applies to text rows that form whole groups in TRL's order (all rows, or a subset of whole
        groups; this process's rows must not start or end inside a group), on a plain (not sharded) model, with a
        source whose context is the same for a whole group, when the config allows it."""
        group = self._group_size()
        return (
            self.args.teacher_prefix_sharing
            and local_rows % group == 0
            and (self.accelerator.process_index * local_rows) % group == 0
            and not model_kwargs
            and (rows is None or _whole_groups(rows, self._group_size()))
            and not (self.source.needs_completions or self.source.needs_generator)  # per-row contexts
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            and self._group_size() > 1
        )

    def _score_teacher_rows(
        self,
        output: dict[str, Any],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        types: dict[str, torch.Tensor],
        rows: torch.Tensor | None,
    ) -> ScoreResult:
        """The teacher's log-probs (and entropy, when the rule reads it) of every row; with `rows`, only those rows
        are scored (their prompts were the only ones built) and the others are 0."""
        entropy = "teacher_entropy" in self.rule.needs
        kwargs = vision.teacher_vision_kwargs(output, types, output["completion_ids"].size(1))
        if rows is None:
            return self._score("teacher", prompt_ids, prompt_mask, output, kwargs, entropy=entropy)
        shape = output["completion_ids"].shape
        logps = torch.zeros(shape, dtype=torch.float32, device=output["completion_ids"].device)
        entropies = torch.zeros_like(logps) if entropy else None
        if rows.numel() == 0:
            return ScoreResult(logps, entropies)
        scored = self._score("teacher", prompt_ids, prompt_mask, output, kwargs, entropy=entropy, rows=rows)
        logps = logps.to(scored.logps.dtype).index_copy(0, rows, scored.logps)
        if entropies is not None:
            entropies = entropies.to(scored.entropy.dtype).index_copy(0, rows, scored.entropy)
        return ScoreResult(logps, entropies)

    def _group_size(self) -> int:
        """Completions per prompt in the current mode."""
        return self.num_generations if self.model.training else self.num_generations_eval

    def _scoring_batch_size(self) -> int:
        """Rows per no-grad scoring forward: TRL's per-device batch of the current mode."""
        training = self.model.training
        return self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size

    # ------------------------------------------------------------------------------------------------ credit
    def _token_advantages(
        self, entries: RLSDEntries, batch: dict[str, Any], student_logps: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """Apply the configured rule to a batch's deferred credit; log its metrics under `rlsd/`."""
        mask = loss_mask(batch)
        # a row without privileged context gets Delta = 0: its teacher is the student itself
        teacher_logps = torch.where(entries.has_context.unsqueeze(1), entries.teacher_logps, student_logps)
        signals = Signals(
            seq_advantages=entries.seq_advantages,
            mask=mask,
            teacher_logps=teacher_logps,
            student_logps=student_logps,
            teacher_entropy=entries.teacher_entropy,
            step_ids=_step_ids(batch),
            vocab_size=self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size,
            span_mask=self._think_span(batch) if self.args.rlsd_span == "think" else None,
        )
        values = {key: float(value) for key, value in entries.state_values.items()}
        params = rule_params(self.args, lam=float(entries.lam), **values)
        if "group_ids" in self.rule.needs:
            token_adv, metrics = self._rule_on_global_groups(signals, params, mode)
        elif entries.scored is not None:
            token_adv, metrics = _rule_on_rows(self.rule.fn, signals, params, entries.scored)
        else:
            token_adv, metrics = self.rule.fn(signals, params)
        self._log_across_processes(mode, metrics)
        return token_adv.to(entries.seq_advantages.dtype)

    def _rule_on_global_groups(
        self, signals: Signals, params: RuleParams, mode: str
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
        group_ids = torch.arange(total, device=signals.mask.device) // self._group_size()
        everyone = dataclasses.replace(signals, **gathered, group_ids=group_ids)
        token_adv, metrics = self.rule.fn(everyone, params)
        start = self.accelerator.process_index * local_rows
        if not self.accelerator.is_main_process:
            metrics = {key: (0.0 if key.endswith("_count") else value) for key, value in metrics.items()}
        return token_adv[start : start + local_rows, :local_length], metrics

    def _think_span(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) completion tokens inside the reasoning span (`rlsd_span="think"`), from each token's text."""
        ids = batch["completion_ids"]
        pieces = [self._tokenizer.batch_decode(row.unsqueeze(1)) for row in ids.cpu()]
        return think_span_mask(pieces, ids.size(1)).to(ids.device) & batch["completion_mask"].bool()

    def _log_across_processes(self, mode: str, metrics: dict[str, float]) -> None:
        """`rlsd.metrics.reduce_metrics` into TRL's `_metrics`: the `log` callable every collaborator is handed."""
        reduce_metrics(self.accelerator, self._metrics, mode, metrics)

    # -------------------------------------------------------------------------------------------------- loss
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; when the credit waits for the student log-probs, they come from this forward, detached; with
        a distillation loss, the teacher runs once here (its hidden states also give the deferred credit its
        log-probs when `teacher_at_loss`) and the distillation term (and SDPG's anchor) from the same forward is
        added."""
        entries = RLSDEntries.from_batch(inputs)
        if not entries.deferred and self.distill_fn is None and entries.rollout_ids is None:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered rollout batch stays untouched for later iterations
        rule_reads_pass = entries.deferred and entries.teacher_logps is None
        teacher = None
        if self.distill_fn is not None:
            teacher, logps = self._teacher_hidden(inputs, entries, with_logps=rule_reads_pass)
            if rule_reads_pass:  # the rule's teacher log-probs, from the same pass
                entries.teacher_logps = logps
        mad = self.mad_teachers if teacher is not None else []
        others = [self._teacher_hidden(inputs, entries, owner)[0] for owner in mad]
        state = LossState(entries if entries.deferred else None, inputs)
        backbone, head = backbone_and_head(self.accelerator.unwrap_model(model))
        self._loss_state = state
        try:
            with _captured_output(backbone if teacher is not None else None) as student_hidden:
                loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_state = None
        if state.logps is None:
            raise RuntimeError(
                "TRL's loss never called _get_per_token_logps_and_entropies, so the token credit that waits for its "
                "log-probs was not computed and the step would silently train with sequence advantages; this "
                "trainer relies on TRL 1.16's loss (check the TRL version and loss options such as liger)"
            )
        if teacher is None:
            return loss + self.rollout_term.term(model, inputs, entries, state.logps)
        completion_length = inputs["completion_ids"].size(1)
        student = torch.cat(student_hidden)[:, -completion_length - 1 : -1]
        extra = self._distillation_term(inputs, (student, head), teacher, state.logps, others)
        rollout = self.rollout_term.term(model, inputs, entries, state.logps)
        return self.args.policy_loss_coef * loss + extra + rollout

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
                state.batch["advantages"] = self._token_advantages(state.pending, state.batch, student, mode)
        return logps, entropies, aux_loss

    @torch.no_grad()
    def _teacher_hidden(
        self,
        inputs: dict[str, Any],
        entries: RLSDEntries,
        owner: ExternalTeacher | None = None,
        *,
        with_logps: bool = False,
    ) -> tuple[tuple[torch.Tensor, torch.nn.Module], torch.Tensor | None]:
        """The teacher's (or `owner`'s, one of MAD-OPD's teachers) last hidden states at the completion positions,
        (B, T, H), and its LM head, plus (with `with_logps`) its sampled-token log-probs: one no-grad forward on
        [teacher prompt ; completion] with the teacher's current weights, under the accelerator's autocast as the
        student's loss forward runs. The log-probs come from TRL's own scoring forward (fused head, logit scaling,
        autocast), so that they compare exactly with the student's; without them a plain text model runs its backbone
        only (no head projection to discard), and a sharded or vision model runs whole, as TRL scores it."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([entries.teacher_prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([entries.teacher_prompt_mask, inputs["completion_mask"]], dim=1)
        kwargs = vision.teacher_vision_kwargs(inputs, entries.teacher_types, completion_ids.size(1))
        logps = None
        with self._scoring_model("teacher", owner) as teacher_model, self.accelerator.autocast():
            backbone, head = backbone_and_head(self.accelerator.unwrap_model(teacher_model))
            if with_logps or kwargs or self.is_fsdp_enabled or self.is_deepspeed_enabled:
                with _captured_output(backbone) as hidden:
                    logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                        self, teacher_model, input_ids, attention_mask, completion_ids.size(1), **kwargs
                    )
                states = torch.cat(hidden)
            else:
                output = backbone(input_ids=input_ids, attention_mask=attention_mask)
                states = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return (states[:, -completion_ids.size(1) - 1 : -1], head), (logps if with_logps else None)

    def _distillation_term(
        self,
        inputs: dict[str, Any],
        student: tuple[torch.Tensor, torch.nn.Module],
        teacher: tuple[torch.Tensor, torch.nn.Module],
        student_logps: torch.Tensor,
        others: list[tuple[torch.Tensor, torch.nn.Module]] | None = None,
    ) -> torch.Tensor:
        """distill_coef * token mean of the distillation loss (+ SDPG's anchor), over the micro-batch's completion
        tokens and scaled for gradient accumulation; rows without context (or gated out) contribute zero. With
        MAD-OPD's further teachers (`others`), the loss is their confidence-weighted sum with `teacher`'s
        (`rlsd.distill.selected_mad_opd_loss`)."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        token_mask = loss_mask(inputs).float()
        weights = token_mask * inputs["rlsd_distill_weight"].unsqueeze(1)
        selected = weights > 0
        tokens = token_mask.sum().clamp(min=1.0)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        (student_hidden, student_head), (teacher_hidden, teacher_head) = student, teacher
        # the same keys on every process (NaN where nothing was distilled): metrics are gathered
        metrics = {
            "distill_token_frac": TokenMean((selected.sum() / tokens).item(), token_mask.sum().item()),
            "distill_loss": TokenMean(math.nan, 0),
        }
        probe = OverlapProbe(args.distill_overlap_k) if args.distill_overlap_k > 0 and not others else None
        if probe is not None:
            metrics["topk_overlap"] = TokenMean(math.nan, 0)
        # every process gathers FSDP2-sharded heads and runs the backward, also with no selected token (then 0)
        if others:
            per_token, mad_weights = selected_mad_opd_loss(
                self.distill_fn, student_hidden, [teacher_hidden, *(hidden for hidden, _ in others)], selected,
                (student_head, [teacher_head, *(head for _, head in others)]), self.temperature,
                inputs["completion_ids"], confidence=args.mad_opd_confidence, mad_temperature=args.mad_opd_temperature,
                chunk_tokens=args.distill_chunk_tokens,
            )  # fmt: skip
            for index, row in enumerate(mad_weights):
                mean = row.mean().item() if row.numel() else math.nan
                metrics[f"mad_weight_{index}"] = TokenMean(mean, row.numel())
        else:
            per_token = selected_token_loss(
                self.distill_fn, student_hidden, teacher_hidden, selected, (student_head, teacher_head),
                self.temperature, chunk_tokens=args.distill_chunk_tokens, overlap=probe,
            )  # fmt: skip
        if probe is not None and per_token.numel():
            metrics["topk_overlap"] = TokenMean(probe.values().mean().item(), per_token.numel())
        distill = (per_token * weights[selected]).sum() / tokens
        if per_token.numel():
            mass = weights[selected].sum()
            metrics["distill_loss"] = TokenMean(
                ((per_token.detach() * weights[selected]).sum() / mass).item(), mass.item()
            )
        term = args.distill_coef * distill
        if "rlsd_ref_logps" in inputs:
            penalty = (sdpg_ref_penalty(student_logps, inputs["rlsd_ref_logps"]) * token_mask).sum() / tokens
            metrics["ref_penalty"] = TokenMean(penalty.item(), token_mask.sum().item())
            term = term + args.sdpg_ref_coef * penalty
        self._log_across_processes(mode, metrics)
        return term / accumulation

    # ---------------------------------------------------------------------------------------- non-finite guards
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """TRL's loss; in training a NaN or inf loss stops the run here, before its backward pass, the optimizer
        step or any save, naming the step and the batch entries that are not finite."""
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        value = loss[0] if isinstance(loss, tuple) else loss
        if self.model.training and not self.args.fp16 and not torch.isfinite(value.detach()).all():
            bad = [
                k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()
            ]
            found = f" (not finite in the batch: {', '.join(bad)})" if bad else ""
            raise NonFiniteError(f"training step {self.state.global_step + 1}", f"the loss is {value.item()}{found}",
                                 self._nonfinite_fix())  # fmt: skip
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """HF's gradient norm (computed before every optimizer step); a NaN or inf one stops the run before the
        optimizer applies it, naming the step and the first parameter whose gradient is not finite (with fp16, the
        loss scaler skips such steps itself)."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        if not self.args.fp16 and not math.isfinite(value):
            name = _first_nonfinite_grad(model)
            where = f" (first in {name})" if name else ""
            raise NonFiniteError(f"training step {self.state.global_step + 1}", f"the gradient norm is {value}{where}",
                                 self._nonfinite_fix())  # fmt: skip
        return norm

    def _nonfinite_fix(self) -> str:
        """How to fix a non-finite step: what was not applied, and the knobs this run changed from their defaults."""
        changed = _changed_knobs(self.args)
        return (
            "nothing from this step was applied or saved and the last checkpoint is intact; check the learning rate"
            + (f", the knobs this run changed ({changed})" if changed else "")
            + " and the rewards of this batch, then resume"
        )

    # ------------------------------------------------------------------------------------------- checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """TRL's training loop; a checkpoint to resume from is verified first, file by file (`rlsd.checkpoint`)."""
        checkpoint = self._verified_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _verified_checkpoint(self, resume: str | bool | None) -> str | None:
        """The checkpoint to resume from (True: the latest `checkpoint-N` of output_dir), refused when it is torn,
        misses a file or holds an unreadable one; a weights-only resume names what it starts fresh."""
        self._fresh_on_resume: list[str] = []
        if resume is None or resume is False:
            return None
        if resume is True:
            output_dir = self.args.output_dir
            resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if resume is None:
                raise CheckpointError(f"output folder {output_dir}", "holds no checkpoint-N folder to resume from",
                                      "train without resuming, or pass the path of a checkpoint")  # fmt: skip
        self._fresh_on_resume = checkpoint_files.verify(
            str(resume),
            required=[TRAINER_STATE_NAME],
            expected=self._hf_state_files() + self._rlsd_state_files(),
            weights_only=self.args.resume_weights_only,
        )
        if self._fresh_on_resume and self.accelerator.is_main_process:
            logger.warning("resume_weights_only: %s lacks %s; that state starts fresh", resume,
                           ", ".join(self._fresh_on_resume))  # fmt: skip
        return str(resume)

    def _hf_state_files(self) -> list[str]:
        """The optimizer, scheduler and RNG files HF writes into a checkpoint of this run (DeepSpeed and FSDP keep
        theirs in sub-folders, which the manifest covers)."""
        if self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return []
        rng = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
        return ["optimizer.pt", "scheduler.pt", rng]

    def _rlsd_state_files(self) -> list[str]:
        """The files RLSD adds to a checkpoint of this run: the teacher's state and weights, the rule's state."""
        files = []
        if self.teacher is not None:
            files.append(TEACHER_STATE_FILE)
            if self.teacher.has_weights:
                files.append(TEACHER_WEIGHTS_FILE)
        if self.rule_state is not None:
            files.append(RULE_STATE_FILE)
        return files

    def _save_checkpoint(self, model, trial):
        """`_write_checkpoint` under a temporary name (`.rlsd-partial-checkpoint-N/checkpoint-N`), sealed with a
        manifest of every file and its size, then renamed to `checkpoint-N`: a run killed while saving leaves no
        `checkpoint-N` that looks complete. A failed write is removed; a full disk is reported as one."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = checkpoint_files.staging_root(run_dir, name)
        if self.args.should_save:
            checkpoint_files.discard(root)  # a torn write of this step by an earlier, killed run
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: root  # HF and TRL write (and rotate) inside the staging folder
        try:
            self._write_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._unstage_best_checkpoint(root, run_dir, name)
                checkpoint_files.seal(os.path.join(root, name), self.state.global_step)
        except Exception as err:
            if self.args.should_save:
                checkpoint_files.discard(root)
            if checkpoint_files.is_disk_full(err, run_dir):
                raise checkpoint_files.disk_full_error(name, run_dir) from err
            raise
        finally:
            del self._get_output_dir
        if self.args.should_save:
            checkpoint_files.publish(os.path.join(root, name), os.path.join(run_dir, name))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip
        self.accelerator.wait_for_everyone()

    def _unstage_best_checkpoint(self, root: str, run_dir: str, name: str) -> None:
        """HF records the best checkpoint where it was written: point it at its final place (state and file)."""
        best = self.state.best_model_checkpoint
        if best and best.startswith(root):
            self.state.best_model_checkpoint = run_dir + best[len(root) :]
            self.state.save_to_json(os.path.join(root, name, TRAINER_STATE_NAME))

    def _write_checkpoint(self, model, trial):
        """TRL's checkpoint plus the teacher's weights and sync state."""
        super()._save_checkpoint(model, trial)
        if self.teacher is not None:  # on every process: gathering a sharded (FSDP2) teacher is a collective
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            self.teacher.save(folder, self.accelerator.unwrap_model, write=self.args.should_save)
        if self.rule_state is not None and self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            with open(os.path.join(folder, RULE_STATE_FILE), "w") as f:
                json.dump(self.rule_state.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resuming restores the teacher and the rule state together with the optimizer (verified before: see
        `train`); in a weights-only resume, a missing teacher restarts from the resumed policy."""
        super()._load_optimizer_and_scheduler(checkpoint)
        fresh = set(getattr(self, "_fresh_on_resume", []))
        if self.teacher is not None and checkpoint is not None:
            if fresh & {TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE}:
                policy = self.accelerator.unwrap_model(self.model)
                if self.teacher.model is not None and self.teacher.has_weights:
                    SyncRefModelCallback.sync_target_model(policy, self.teacher.model, alpha=1.0)
                else:  # a PEFT policy's teacher adapter, if any (an external teacher: nothing)
                    self.teacher.follow(policy)
            else:
                self.teacher.load(checkpoint, self.accelerator.unwrap_model)
        if self.rule_state is not None and checkpoint is not None and RULE_STATE_FILE not in fresh:
            with open(os.path.join(checkpoint, RULE_STATE_FILE)) as f:
                self.rule_state.load_state_dict(json.load(f))


def _set_fields(args: RLSDConfig, values: dict[str, Any]) -> None:
    """Set a stage's field values on the config."""
    for name, value in values.items():
        setattr(args, name, value)


def _guard_rewards(reward_funcs: Any, timeout_s: float) -> Any:
    """Plain reward functions are wrapped so that an exception, a call longer than `timeout_s` or a malformed
    output names the function (`guard_reward`); model names, reward models and async functions pass unchanged."""

    def guard(func: Any) -> Any:
        if isinstance(func, str | torch.nn.Module) or not callable(func) or inspect.iscoroutinefunction(func):
            return func
        return guard_reward(func, timeout_s)

    return [guard(f) for f in reward_funcs] if isinstance(reward_funcs, list) else guard(reward_funcs)


def _rule_on_rows(
    rule_fn: Callable[[Signals, RuleParams], tuple[torch.Tensor, dict[str, float]]],
    signals: Signals,
    params: RuleParams,
    rows: torch.Tensor,
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


def _first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf (None when none is found)."""
    try:
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                return name
    except RuntimeError:  # a sharded gradient that cannot be checked locally
        return None
    return None


def _changed_knobs(args: RLSDConfig) -> str:
    """RLSD's own numeric knobs that differ from their defaults, as `name=value` (for non-finite step errors)."""
    own = {f.name for f in dataclasses.fields(RLSDConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    changed = []
    for item in dataclasses.fields(args):
        value = getattr(args, item.name)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if item.name in own and numeric and value != item.default:
            changed.append(f"{item.name}={value}")
    return ", ".join(changed)


@contextlib.contextmanager
def _captured_output(module: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Collect the last hidden state of every forward of `module` (a backbone) while the context is open, graph
    included; None captures nothing."""
    captured: list[torch.Tensor] = []
    if module is None:
        yield captured
        return

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _step_ids(batch: dict[str, Any]) -> torch.Tensor:
    """Index of the assistant segment of each completion token: segments are separated by tool outputs (TRL's
    tool mask is 0 on them); a single-turn completion is one step, 0 everywhere."""
    mask = batch["completion_mask"]
    tool_mask = batch.get("tool_mask")
    if tool_mask is None:
        return torch.zeros_like(mask, dtype=torch.long)
    resumes = (tool_mask[:, 1:] == 1) & (tool_mask[:, :-1] == 0)
    return torch.cat([torch.zeros_like(mask[:, :1]), resumes.long().cumsum(1)], dim=1)


@dataclasses.dataclass
class RolloutTap:
    """What TRL's rollout used and scored, handed to this trainer's rollout by `_calculate_rewards` while it runs:
    this process's prompts as the rollout sent them to the model (an environment's `reset` observation included),
    and the weighted total rewards of every process's rows (B_global,), NaN where every function abstained."""

    prompts: list[Any] | None = None
    rewards: torch.Tensor | None = None


class TeacherInputs(NamedTuple):
    """The teacher prompts of a rollout's scored rows, left-padded (ids, mask, token types by processor key), and
    which of all its rows have privileged context."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    token_types: dict[str, torch.Tensor]
    has_context: torch.Tensor


@dataclasses.dataclass
class LossState:
    """What `_compute_loss` hands to the next scoring forward TRL's loss runs (`self._loss_state`): the deferred
    credit and the micro-batch whose advantages it replaces; the forward stores its log-probs back."""

    pending: RLSDEntries | None
    batch: dict[str, Any]
    logps: torch.Tensor | None = None


def _whole_groups(rows: torch.Tensor, group_size: int) -> bool:
    """True when `rows` lists whole groups of consecutive rows, each in order (the teacher's rows after the skip of
    A_i = 0 usually are: a group's completions all have A_i = 0, or, with binary rewards, none has)."""
    if rows.numel() == 0 or rows.numel() % group_size:
        return False
    blocks = rows.view(-1, group_size)
    starts = blocks[:, :1]
    offsets = torch.arange(group_size, device=rows.device)
    return bool((starts % group_size == 0).all() and (blocks == starts + offsets).all())
