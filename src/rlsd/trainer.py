"""`RLSDTrainer`: TRL's `GRPOTrainer` with token-level credit from a privileged self-teacher.

The trainer only gathers log-probs and hands (B, T) token advantages to TRL's own loss:
1. after TRL's rollout and scoring, one no-grad teacher forward on [teacher prompt ; completion], the teacher
   prompt showing the reference answer, a successful sibling completion, or both;
2. the student's sampled-token log-probs are TRL's old log-probs when TRL computes them, else the detached
   log-probs of the loss's own forward (no extra pass);
3. a credit rule (`rlsd.rules`) turns (A_i, teacher, student, mask, ...) into A_it.
With a distillation loss (`distill_loss`), the student's last hidden states are captured from the loss's own
forward (a hook on the backbone) and the teacher's are recomputed without gradient at loss time; `rlsd.distill`
projects both to the vocabulary a chunk of tokens at a time.
With a vision-language model (a processor and an `image`/`images` column), the teacher prompt keeps the image
blocks and every teacher or re-scoring forward gets the rollout's vision tensors, the teacher with its own
token-type ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from datasets import Dataset, IterableDatasetDict
from torch.distributed.tensor import DTensor
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import pad

from rlsd import checkpoint as checkpoint_files
from rlsd.config import RLSDConfig
from rlsd.credit import TokenMean, grpo_advantages, rlsd_lambda, think_span_mask
from rlsd.distill import chunked_token_loss, sdpg_ref_penalty, token_loss_fn
from rlsd.rewards import guard_reward
from rlsd.rules import AntiSDGate, RuleParams, Signals, get_rule
from rlsd.teacher import TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE, SelfTeacher, TeacherSyncCallback, _is_peft_model
from rlsd.teacher_prompt import (
    NO_SIBLING_TEXT,
    PRIVILEGED_SOURCES,
    has_image_blocks,
    is_empty_answer,
    pick_siblings,
    render_teacher_prompts,
    validate_teacher_template,
)
from rlsd.validate import CheckpointError, NonFiniteError

logger = logging.getLogger(__name__)
RULE_STATE_FILE = "rlsd_rule_state.json"
IMAGE_COLUMNS = ("image", "images")
IMAGE_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "num_tiles", "pixel_attention_mask", "spatial_shapes",
    "image_sizes", "image_position_ids",
)  # fmt: skip
"""The per-image inputs TRL 1.16 hands to every scoring forward of a vision-language model (the same for the teacher:
it sees the same images)."""
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
"""Per-token inputs of a vision-language model, recomputed for the teacher's sequence."""


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
        self.rule = get_rule(args.credit)
        self.rule_uses_teacher = "teacher_logps" in self.rule.needs
        self.distill_fn = (
            None
            if args.distill_loss == "none"
            else token_loss_fn(
                args.distill_loss, beta=args.distill_jsd_beta, topk=args.distill_topk, tail=args.distill_tail
            )
        )
        self.uses_teacher = self.rule_uses_teacher or self.distill_fn is not None
        # a multiplicative rule gives A_it = 0 on rows with A_i = 0 whatever the teacher says: unless a distillation
        # term needs the teacher there too, those rows are neither rendered nor scored by the teacher
        self.skips_known_credit = self.rule.multiplicative and self.distill_fn is None
        self.shows_answer = "answer" in PRIVILEGED_SOURCES[args.privileged_source]
        if self.uses_teacher and self.shows_answer:
            if args.remove_unused_columns:
                raise ValueError(
                    f"remove_unused_columns=True would drop the privileged column {args.privileged_column!r}; "
                    "set it to False"
                )
            for split_name in ("train_dataset", "eval_dataset"):
                _check_privileged_column(kwargs.get(split_name), args.privileged_column, split_name)
        if self.uses_teacher and not args.disable_dropout:
            # the teacher scores in eval mode; dropout in the student's train-mode forward would enter Delta
            logger.info("a self-teacher is used: setting disable_dropout=True (TRL then zeroes every nn.Dropout)")
            args.disable_dropout = True
        super().__init__(model, _guard_rewards(reward_funcs, args.reward_timeout), args=args, **kwargs)
        self.vision = _image_dataset(kwargs.get("train_dataset")) or _image_dataset(kwargs.get("eval_dataset"))
        if self.uses_teacher:
            self._check_vision_supported(kwargs)
        if self._is_vlm:  # the row-subset teacher pass would have to slice the vision tensors: every row is scored
            self.skips_known_credit = False

        self._loss_state: dict[str, Any] | None = None
        self._last_rewards: torch.Tensor | None = None
        self.antisd_gate = AntiSDGate(args.antisd_warmup_steps, args.antisd_ratio) if args.credit == "antisd" else None
        self.teacher: SelfTeacher | None = None
        if self.uses_teacher:
            policy = self.accelerator.unwrap_model(self.model)
            _check_no_attention_dropout(policy)
            self.teacher = SelfTeacher(
                args.teacher,
                policy,
                sync_steps=args.teacher_sync_steps,
                ema_decay=args.teacher_ema_decay,
                temperature=self.temperature,
                with_entropy="teacher_entropy" in self.rule.needs,
                cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
            )
            if self.teacher.model is not None:
                self.teacher.model = self._prepare_frozen_model(self.teacher.model)
            if args.teacher in ("synced", "ema"):
                self.add_callback(TeacherSyncCallback(self))
        self.reference: SelfTeacher | None = None
        if self.distill_fn is not None:
            _check_plain_lm_head(self.accelerator.unwrap_model(self.model))
            if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise NotImplementedError(
                    "distill_loss projects the captured hidden states through the LM head after the forward, which "
                    "ZeRO-3 has re-partitioned; use FSDP2 or ZeRO-2, or a token-advantage rule (credit=...)"
                )
            if args.distill_loss == "sdpg" and args.sdpg_ref_coef > 0:  # SDPG's anchor to the initial model
                policy = self.accelerator.unwrap_model(self.model)
                self.reference = SelfTeacher(
                    "initial", policy, sync_steps=1, ema_decay=0.0, temperature=self.temperature,
                    cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                )  # fmt: skip
                if self.reference.model is not None:
                    self.reference.model = self._prepare_frozen_model(self.reference.model)

    # ----------------------------------------------------------------------------------------------- set-up
    def _check_vision_supported(self, kwargs: dict[str, Any]) -> None:
        """With a teacher, images are supported from an `image`/`images` column (the prompts may hold TRL's empty
        image placeholders) with a processor and single-turn rollouts; image blocks in the prompts of a dataset without
        an image column, a plain tokenizer, tools, environments or a rollout function are refused (the teacher, or
        TRL's own scoring, would not see the images)."""
        for split_name in ("train_dataset", "eval_dataset"):
            split = kwargs.get(split_name)
            if _prompts_hold_images(split) and not _image_dataset(split):
                raise ValueError(_IMAGE_BLOCKS_ERROR.format(where=split_name))
        if not self.vision:
            return
        what = _teacher_use(self.args)
        if not self._is_vlm:
            raise ValueError(_TOKENIZER_WITH_IMAGES_ERROR.format(what=what))
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

    def _prepare_frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place a no-grad copy the way TRL places its reference model (DeepSpeed, FSDP or plain device)."""
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
        """The teacher is skipped when the rule ignores it, or when its multiplier is identically 1 (lam = 0 or
        eps_w = 0 for the rules that reduce to GRPO there)."""
        if not self.rule_uses_teacher:
            return False
        if self.rule.grpo_when_lambda_zero:
            return lam > 0.0 and self.args.rlsd_clip > 0.0
        return True

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout and scoring, then the teacher's context, the teacher pass and (B, T) token advantages."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(output)
        lam = self._current_lambda() if self.rule_uses_teacher else 0.0
        if self.rule_uses_teacher:
            self._metrics[mode]["rlsd/lambda"].append(lam)
        teacher_rows = self._teacher_rows(output["advantages"]) if self.skips_known_credit else None
        if self.uses_teacher:
            output.update(self._teacher_context(inputs, output, mode, rows=teacher_rows))
        if self.distill_fn is not None:
            weight = output["rlsd_has_context"].float()
            if self.args.distill_positive_only:
                weight = weight * (output["advantages"] > 0).float()
            output["rlsd_distill_weight"] = weight
        if self.reference is not None:
            output["rlsd_ref_logps"] = self._reference_logps(output)
        if not self._teacher_pass_needed(lam):
            output["advantages"], _ = grpo_advantages(output["advantages"], mask)
            if self.rule_uses_teacher:
                self._metrics[mode]["rlsd/teacher_time_s"].append(0.0)
            return self._without_unused_context(output)

        start = time.perf_counter()
        teacher_logps, teacher_entropy = self._teacher_logps(output)
        self._metrics[mode]["rlsd/teacher_time_s"].append(time.perf_counter() - start)
        gate = self._antisd_gate_value(teacher_entropy, mask, mode) if self.antisd_gate is not None else 1.0
        pending = {
            "rlsd_seq_advantages": output["advantages"],
            "rlsd_teacher_logps": teacher_logps,
            "rlsd_lambda": torch.tensor(lam, dtype=torch.float64),
            "rlsd_gate": torch.tensor(gate, dtype=torch.float64),
        }
        if teacher_entropy is not None:
            pending["rlsd_teacher_entropy"] = teacher_entropy
        if teacher_rows is not None:  # the rule scores only these rows; the others keep A_it = 0
            pending["rlsd_scored"] = output["advantages"] != 0
        student_logps = output.get("old_per_token_logps")
        if student_logps is None and "group_ids" in self.rule.needs:
            student_logps = self._score_rollout(output)  # group statistics need every completion of a group now
        if student_logps is not None:  # the credit is final at rollout time
            output["advantages"] = self._token_advantages({**output, **pending}, student_logps, mode)
            return self._without_unused_context(output)
        output.update(pending)
        return self._without_unused_context(output)

    def _without_unused_context(self, output: dict[str, Any]) -> dict[str, Any]:
        """The teacher's prompt ids travel to the loss only when a distillation loss re-runs the teacher there."""
        output.pop("rlsd_teacher_rows", None)  # only with the skip, which has no distillation term
        if self.distill_fn is None:
            output.pop("rlsd_teacher_prompt_ids", None)
            output.pop("rlsd_teacher_prompt_mask", None)
            for key in TOKEN_TYPE_KEYS:
                output.pop(f"rlsd_teacher_{key}", None)
        return output

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """TRL's rewards (gathered over processes); the weighted total is kept for choosing successful siblings."""
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        totals = (rewards_per_func * weights).nansum(dim=1)
        totals[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        self._last_rewards = totals
        return rewards_per_func

    def _antisd_gate_value(self, teacher_entropy: torch.Tensor, mask: torch.Tensor, mode: str) -> float:
        """Feed the batch's mean teacher entropy (over all processes) to AntiSD's gate; an eval batch reads the gate
        as training left it and does not move it."""
        if mode != "train":
            return 1.0 if self.antisd_gate.on else 0.0
        totals = torch.stack([(teacher_entropy * mask).sum(), mask.sum()]).double()
        totals = self.accelerator.reduce(totals, reduction="sum")
        return self.antisd_gate.update((totals[0] / totals[1].clamp(min=1)).item())

    @torch.no_grad()
    def _score_rollout(self, output: dict[str, Any]) -> torch.Tensor:
        """The student's log-probs of the rollout with the current weights (only for group-level rules)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].size(1),
            batch_size=self._scoring_batch_size(), **_student_vision_kwargs(output),
        )  # fmt: skip
        return logps

    def _teacher_rows(self, seq_advantages: torch.Tensor) -> torch.Tensor:
        """Indices of the rows the teacher scores under a multiplicative rule: those with A_i != 0 in batch order,
        topped up with rows of known credit to the largest such count over processes, so that every process runs
        the same number of forward chunks (a sharded model gathers its parameters collectively in each)."""
        scored = seq_advantages != 0
        count = scored.sum().reshape(1)
        target = int(self.accelerator.gather(count).max().item())
        order = torch.cat([scored.nonzero().flatten(), (~scored).nonzero().flatten()])
        return order[:target]

    def _teacher_context(
        self, inputs: list[dict[str, Any]], output: dict[str, Any], mode: str, rows: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The teacher's prompt ids (left-padded) of `rows` (all rows when None; else they travel along as
        `rlsd_teacher_rows`) and which rows have a privileged context at all (a row whose source is only a sibling
        has none when no sibling succeeded); rows without one are counted. Rows outside `rows` are neither rendered
        nor tokenized."""
        selected = list(range(len(inputs))) if rows is None else rows.tolist()
        answers = self._privileged_answers([inputs[i] for i in selected]) if self.shows_answer else None
        siblings = None
        has_context = torch.ones(len(inputs), dtype=torch.bool, device=self.accelerator.device)
        if "sibling" in PRIVILEGED_SOURCES[self.args.privileged_source]:
            siblings, found = self._sibling_completions(output, mode)
            if not self.shows_answer:
                has_context = found
            no_context = TokenMean(1.0 - has_context.float().mean().item(), has_context.numel())
            missing = float((~found).sum())
            self._log_across_processes(mode, {"no_sibling_count": missing, "no_context_frac": no_context})
            siblings = [siblings[i] for i in selected]
        images = _batch_images(inputs)
        prompts = [inputs[i]["prompt"] for i in selected]
        if images is None and any(has_image_blocks(prompt) for prompt in prompts):
            raise ValueError(_IMAGE_BLOCKS_ERROR.format(where="a rollout batch"))
        if images is not None and not self._is_vlm:
            raise ValueError(_TOKENIZER_WITH_IMAGES_ERROR.format(what=_teacher_use(self.args)))
        if images is not None:  # the prompts TRL rolled out: image blocks placed as TRL places them
            prompts = [prepare_multimodal_messages(inputs[i]["prompt"], images=images[i]) for i in selected]
        teacher_prompts = render_teacher_prompts(
            prompts, self.args.teacher_template, answers=answers, siblings=siblings
        )
        device = self.accelerator.device
        if not teacher_prompts:  # no row needs the teacher
            empty = torch.zeros(0, 0, dtype=torch.long, device=device)
            return {
                "rlsd_teacher_prompt_ids": empty,
                "rlsd_teacher_prompt_mask": empty,
                "rlsd_has_context": has_context,
                "rlsd_teacher_rows": rows,
            }
        prompt_ids_list, _, fields = self._tokenize_prompts(teacher_prompts)
        prompt_ids = pad(
            [torch.tensor(ids) for ids in prompt_ids_list],
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
        ).to(device)
        prompt_mask = pad(
            [torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids_list], padding_value=0, padding_side="left"
        ).to(device)
        context = {"rlsd_teacher_prompt_ids": prompt_ids, "rlsd_teacher_prompt_mask": prompt_mask,
                   "rlsd_has_context": has_context}  # fmt: skip
        if images is not None:
            context.update(self._teacher_token_types(fields, prompt_ids, output))
        return context if rows is None else {**context, "rlsd_teacher_rows": rows}

    def _teacher_token_types(
        self, fields: dict[str, Any], prompt_ids: torch.Tensor, output: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The processor's token-type ids of the teacher prompts (left-padded like the ids, as
        `rlsd_teacher_<key>`), after checking that each teacher prompt holds as many image tokens as the student's."""
        pad_id = self._image_pad_token_id
        if pad_id is not None:
            teacher_count = (prompt_ids == pad_id).sum(1)
            student_count = ((output["prompt_ids"] == pad_id) & output["prompt_mask"].bool()).sum(1)
            if not torch.equal(teacher_count, student_count):
                raise RuntimeError(
                    f"the teacher prompts hold {teacher_count.tolist()} image tokens per row but the student's hold "
                    f"{student_count.tolist()}: the teacher would not see the same images; check the chat template"
                )
        context = {}
        for key in TOKEN_TYPE_KEYS:
            if key in fields:
                rows = [torch.as_tensor(row, dtype=torch.long) for row in fields[key]]
                padded = pad(rows, padding_value=0, padding_side="left").to(prompt_ids.device)
                context[f"rlsd_teacher_{key}"] = padded
        return context

    def _privileged_answers(self, inputs: list[dict[str, Any]]) -> list[Any]:
        """The reference answers of a rollout batch; a row without the privileged column is named."""
        column = self.args.privileged_column
        missing = [i for i, row in enumerate(inputs) if column not in row]
        if missing:
            raise KeyError(
                f"rollout row {missing[0]} has no privileged column {column!r}; it has {sorted(inputs[missing[0]])}"
            )
        return [row[column] for row in inputs]

    def _sibling_completions(self, output: dict[str, Any], mode: str) -> tuple[list[str], torch.Tensor]:
        """For each local completion, the text of the first other completion of its group whose total reward reaches
        `sibling_reward_threshold` (groups may span processes: texts and rewards are gathered), and whether one
        exists; rows without one show `NO_SIBLING_TEXT`."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        texts = self._tokenizer.batch_decode(
            [row[keep.bool()] for row, keep in zip(ids, mask, strict=True)], skip_special_tokens=True
        )
        all_texts = gather_object(texts)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        picks = pick_siblings(self._last_rewards.tolist(), group_size, self.args.sibling_reward_threshold)
        start = self.accelerator.process_index * len(texts)
        local = picks[start : start + len(texts)]
        found = torch.tensor([j is not None for j in local], dtype=torch.bool, device=ids.device)
        return [NO_SIBLING_TEXT if j is None else all_texts[j] for j in local], found

    @torch.no_grad()
    def _teacher_logps(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tau_t (and the teacher's entropy when the rule needs it): one no-grad forward on
        [teacher prompt ; completion ids], chunked by the per-device batch. With `rlsd_teacher_rows` (the rows
        whose teacher prompts were built), only those rows are scored and the others are 0."""
        rows = output.get("rlsd_teacher_rows")
        if rows is None:
            return self._teacher_forward(output, output["completion_ids"], output["completion_mask"])
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        logps = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        entropy = torch.zeros_like(logps) if "teacher_entropy" in self.rule.needs else None
        if rows.numel() == 0:
            return logps, entropy
        row_logps, row_entropy = self._teacher_forward(output, completion_ids[rows], completion_mask[rows])
        logps = logps.to(row_logps.dtype).index_copy(0, rows, row_logps)
        if entropy is not None:
            entropy = entropy.to(row_entropy.dtype).index_copy(0, rows, row_entropy)
        return logps, entropy

    def _teacher_forward(
        self, output: dict[str, Any], completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's log-probs (and entropy) of `completion_ids` after the teacher prompts of `output`."""
        input_ids = torch.cat([output["rlsd_teacher_prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([output["rlsd_teacher_prompt_mask"], completion_mask], dim=1)
        policy = self.accelerator.unwrap_model(self.model)
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.teacher.forward_context(self.model, policy) as teacher_model,
        ):
            logps, entropy, _ = self._get_per_token_logps_and_entropies(
                teacher_model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                batch_size=self._scoring_batch_size(),
                compute_entropy="teacher_entropy" in self.rule.needs,
                **_teacher_vision_kwargs(output, completion_ids.size(1)),
            )
        return logps, entropy

    @torch.no_grad()
    def _reference_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """log pi_ref of the sampled tokens under the student's own prompt (SDPG's anchor)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        policy = self.accelerator.unwrap_model(self.model)
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.reference.forward_context(self.model, policy) as reference_model,
        ):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                reference_model, input_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=self._scoring_batch_size(), **_student_vision_kwargs(output),
            )  # fmt: skip
        return logps

    def _scoring_batch_size(self) -> int:
        """Rows per no-grad scoring forward: TRL's per-device batch of the current mode."""
        training = self.model.training
        return self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size

    # ------------------------------------------------------------------------------------------------ credit
    def _token_advantages(self, batch: dict[str, Any], student_logps: torch.Tensor, mode: str) -> torch.Tensor:
        """Apply the configured rule to a batch carrying the `rlsd_*` entries; log its metrics under `rlsd/`."""
        args = self.args
        mask = _loss_mask(batch)
        # a row without privileged context gets Delta = 0: its teacher is the student itself
        has_context = batch["rlsd_has_context"].unsqueeze(1)
        teacher_logps = torch.where(has_context, batch["rlsd_teacher_logps"], student_logps)
        signals = Signals(
            seq_advantages=batch["rlsd_seq_advantages"],
            mask=mask,
            teacher_logps=teacher_logps,
            student_logps=student_logps,
            teacher_entropy=batch.get("rlsd_teacher_entropy"),
            # rows are still in group order only at rollout time, which is where group-level rules are applied
            group_ids=(
                torch.arange(mask.size(0), device=mask.device) // self.num_generations
                if "group_ids" in self.rule.needs
                else None
            ),
            step_ids=_step_ids(batch),
            vocab_size=self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size,
            span_mask=self._think_span(batch) if args.rlsd_span == "think" else None,
        )
        params = RuleParams(
            lam=float(batch["rlsd_lambda"]),
            clip=args.rlsd_clip,
            negative_only=args.rlsd_negative_only,
            opsd_beta=args.opsd_beta,
            antisd_gate=float(batch["rlsd_gate"]),
            egrsd_min_gate=args.egrsd_min_gate,
            egrsd_window=args.egrsd_window,
            sod_c=args.sod_c,
            sod_delta=args.sod_delta,
            uniopd_margin=args.uniopd_margin,
            gear_spike_std=args.gear_spike_std,
        )
        scored = batch.get("rlsd_scored")
        if scored is None:
            token_adv, metrics = self.rule.fn(signals, params)
        else:
            token_adv, metrics = _rule_on_rows(self.rule.fn, signals, params, scored)
        self._log_across_processes(mode, metrics)
        return token_adv.to(batch["rlsd_seq_advantages"].dtype)

    def _think_span(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) completion tokens inside the reasoning span (`rlsd_span="think"`), from each token's text."""
        ids = batch["completion_ids"]
        pieces = [self._tokenizer.batch_decode(row.unsqueeze(1)) for row in ids.cpu()]
        return think_span_mask(pieces, ids.size(1)).to(ids.device) & batch["completion_mask"].bool()

    def _log_across_processes(self, mode: str, metrics: dict[str, float]) -> None:
        """Combine each metric over processes and append it to TRL's metrics under `rlsd/`: a `TokenMean` by the
        count-weighted mean (token-weighted, as TRL's global masked mean), `*_count` metrics by their sum, any other
        value by the mean over processes (NaN-aware)."""
        keys = sorted(metrics)
        values = [metrics[k] for k in keys]
        counts = [getattr(v, "count", math.nan) for v in values]
        local = torch.tensor([values + counts], dtype=torch.float64, device=self.accelerator.device)
        gathered = self.accelerator.gather(local).view(-1, 2 * len(keys))
        for index, key in enumerate(keys):
            column, count = gathered[:, index], gathered[:, len(keys) + index]
            if key.endswith("_count"):
                value = column.nansum()
            elif torch.isnan(count).all():
                value = column.nanmean()
            else:
                counted = count > 0
                value = (column[counted] * count[counted]).sum() / count[counted].sum()
            if not math.isnan(value.item()):
                self._metrics[mode][f"rlsd/{key}"].append(value.item())

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; when the credit waits for the student log-probs, they come from this forward, detached; with
        a distillation loss, the distillation term (and SDPG's anchor) from the same forward is added."""
        deferred = "rlsd_teacher_logps" in inputs
        if not deferred and self.distill_fn is None:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered rollout batch stays untouched for later iterations
        teacher = self._teacher_hidden(inputs) if self.distill_fn is not None else None
        state: dict[str, Any] = {"pending": inputs if deferred else None}
        backbone, head = _backbone_and_head(self.accelerator.unwrap_model(model))
        self._loss_state = state
        try:
            with _captured_output(backbone if teacher is not None else None) as student_hidden:
                loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_state = None
        if "logps" not in state:
            raise RuntimeError(
                "TRL's loss never called _get_per_token_logps_and_entropies, so the token credit that waits for its "
                "log-probs was not computed and the step would silently train with sequence advantages; this "
                "trainer relies on TRL 1.16's loss (check the TRL version and loss options such as liger)"
            )
        if teacher is None:
            return loss
        completion_length = inputs["completion_ids"].size(1)
        student = torch.cat(student_hidden)[:, -completion_length - 1 : -1]
        extra = self._distillation_term(inputs, (student, head), teacher, state["logps"])
        return self.args.policy_loss_coef * loss + extra

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring forward; the first one inside the loss also hands its log-probs to the loss state and turns
        the pending credit into (B, T) advantages."""
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        state, self._loss_state = self._loss_state, None
        if state is not None:
            state["logps"] = logps
            if state["pending"] is not None:
                mode = "train" if self.model.training else "eval"
                state["pending"]["advantages"] = self._token_advantages(state["pending"], logps.detach(), mode)
        return logps, entropies, aux_loss

    @torch.no_grad()
    def _teacher_hidden(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Module]:
        """The teacher's last hidden states at the completion positions, (B, T, H), and its LM head: a no-grad
        forward on [teacher prompt ; completion] with the teacher's current weights."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["rlsd_teacher_prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["rlsd_teacher_prompt_mask"], inputs["completion_mask"]], dim=1)
        policy = self.accelerator.unwrap_model(self.model)
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.teacher.forward_context(self.model, policy) as teacher_model,
        ):
            backbone, head = _backbone_and_head(self.accelerator.unwrap_model(teacher_model))
            with _captured_output(backbone) as hidden:
                GRPOTrainer._get_per_token_logps_and_entropies(
                    self, teacher_model, input_ids, attention_mask, completion_ids.size(1),
                    **_teacher_vision_kwargs(inputs, completion_ids.size(1)),
                )  # fmt: skip
        return torch.cat(hidden)[:, -completion_ids.size(1) - 1 : -1], head

    def _distillation_term(
        self,
        inputs: dict[str, Any],
        student: tuple[torch.Tensor, torch.nn.Module],
        teacher: tuple[torch.Tensor, torch.nn.Module],
        student_logps: torch.Tensor,
    ) -> torch.Tensor:
        """distill_coef * token mean of the distillation loss (+ SDPG's anchor), over the micro-batch's completion
        tokens and scaled for gradient accumulation; rows without context (or gated out) contribute zero."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        loss_mask = _loss_mask(inputs).float()
        weights = loss_mask * inputs["rlsd_distill_weight"].unsqueeze(1)
        selected = weights > 0
        tokens = loss_mask.sum().clamp(min=1.0)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        (student_hidden, student_head), (teacher_hidden, teacher_head) = student, teacher
        # the same keys on every process (NaN where nothing was distilled): metrics are gathered
        metrics = {
            "distill_token_frac": TokenMean((selected.sum() / tokens).item(), loss_mask.sum().item()),
            "distill_loss": TokenMean(math.nan, 0),
        }
        if selected.any():
            per_token = chunked_token_loss(
                self.distill_fn,
                student_hidden[selected].unsqueeze(0),
                teacher_hidden[selected].unsqueeze(0),
                _logits_fn(student_head, self.temperature),
                _logits_fn(teacher_head, self.temperature),
                chunk_tokens=args.distill_chunk_tokens,
            ).squeeze(0)
            distill = (per_token * weights[selected]).sum() / tokens
            mass = weights[selected].sum()
            metrics["distill_loss"] = TokenMean(
                ((per_token.detach() * weights[selected]).sum() / mass).item(), mass.item()
            )
        else:  # a differentiable zero keeps every process's backward identical
            distill = student_hidden.sum() * 0.0
        term = args.distill_coef * distill
        if "rlsd_ref_logps" in inputs:
            penalty = (sdpg_ref_penalty(student_logps, inputs["rlsd_ref_logps"]) * loss_mask).sum() / tokens
            metrics["ref_penalty"] = TokenMean(penalty.item(), loss_mask.sum().item())
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
            if self.teacher.model is not None:
                files.append(TEACHER_WEIGHTS_FILE)
        if self.antisd_gate is not None:
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
        if self.teacher is not None and self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            self.teacher.save(folder, self.accelerator.unwrap_model)
        if self.antisd_gate is not None and self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            with open(os.path.join(folder, RULE_STATE_FILE), "w") as f:
                json.dump(self.antisd_gate.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resuming restores the teacher and the rule state together with the optimizer (verified before: see
        `train`); in a weights-only resume, a missing teacher restarts from the resumed policy."""
        super()._load_optimizer_and_scheduler(checkpoint)
        fresh = set(getattr(self, "_fresh_on_resume", []))
        if self.teacher is not None and checkpoint is not None:
            if fresh & {TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE}:
                if self.teacher.model is not None:
                    policy = self.accelerator.unwrap_model(self.model)
                    SyncRefModelCallback.sync_target_model(policy, self.teacher.model, alpha=1.0)
            else:
                self.teacher.load(checkpoint, self.accelerator.unwrap_model)
        if self.antisd_gate is not None and checkpoint is not None and RULE_STATE_FILE not in fresh:
            with open(os.path.join(checkpoint, RULE_STATE_FILE)) as f:
                self.antisd_gate.load_state_dict(json.load(f))


_IMAGE_BLOCKS_ERROR = (
    "{where} has image blocks inside its prompts and no `image`/`images` column: TRL 1.16 passes pixel values to "
    "its scoring forwards only for images from such a column, so neither the loss nor the self-teacher would see "
    "these images; put the images in an `images` column (the prompts may keep empty {{'type': 'image'}} "
    "placeholders) or use credit='grpo' with distill_loss='none'"
)

_TOKENIZER_WITH_IMAGES_ERROR = (
    "the dataset has an image column and {what} uses the self-teacher, but processing_class is a tokenizer: the "
    "teacher would score the completions without the images; pass the model's processor (AutoProcessor) as "
    "processing_class"
)


def _teacher_use(args: RLSDConfig) -> str:
    """What in the config uses the self-teacher, for error messages."""
    parts = [f"credit={args.credit!r}"] if args.credit != "grpo" else []
    if args.distill_loss != "none":
        parts.append(f"distill_loss={args.distill_loss!r}")
    return " with ".join(parts) or "the config"


def _image_dataset(dataset: Any) -> bool:
    """True when a dataset (or any split of a dict of them) has an `image` or `images` column."""
    if dataset is None:
        return False
    parts = dataset.values() if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
    return any(set(IMAGE_COLUMNS) & set(getattr(part, "column_names", None) or []) for part in parts)


def _prompts_hold_images(dataset: Any, rows: int = 16) -> bool:
    """True when one of the first `rows` prompts of a map-style dataset (or any split) holds an image block."""
    if dataset is None:
        return False
    parts = dataset.values() if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
    for part in parts:
        if not isinstance(part, Dataset) or "prompt" not in part.column_names:
            continue
        if any(has_image_blocks(prompt) for prompt in part.select(range(min(rows, len(part))))["prompt"]):
            return True
    return False


def _batch_images(inputs: list[dict[str, Any]]) -> list[list[Any] | None] | None:
    """The images of each rollout row exactly as TRL 1.16 collects them (`images` list or single `image` column);
    None when the batch carries none."""
    if "images" in inputs[0]:
        images = [row.get("images") for row in inputs]
    elif "image" in inputs[0]:
        images = [[row.get("image")] if row.get("image") is not None else None for row in inputs]
    else:
        return None
    return None if all(not image_list for image_list in images) else images


def _student_vision_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The vision inputs TRL stored with the rollout (images and the student's token types), for a forward on
    [student prompt ; completion]; empty for text."""
    return {key: batch[key] for key in (*IMAGE_KEYS, *TOKEN_TYPE_KEYS) if batch.get(key) is not None}


def _teacher_vision_kwargs(batch: dict[str, Any], completion_length: int) -> dict[str, Any]:
    """The same images as the student's, with the teacher prompt's token types extended by zeros over the
    completion, for a forward on [teacher prompt ; completion]; empty for text."""
    kwargs = {key: batch[key] for key in IMAGE_KEYS if batch.get(key) is not None}
    for key in TOKEN_TYPE_KEYS:
        prompt_types = batch.get(f"rlsd_teacher_{key}")
        if prompt_types is not None:
            zeros = prompt_types.new_zeros(prompt_types.size(0), completion_length)
            kwargs[key] = torch.cat([prompt_types, zeros], dim=1)
    return kwargs


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


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body whose output TRL's fused head projects, and the LM head (PEFT wrappers looked through)."""
    base = model.get_base_model() if _is_peft_model(model) else model
    return base.base_model, base.get_output_embeddings()


def _logits_fn(head: torch.nn.Module, temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states -> float32 logits / temperature through `head`, as TRL's fused head scores them (FSDP2's
    sharded head is gathered as TRL does)."""

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        return F.linear(hidden.to(weight.dtype), weight, bias).float() / temperature

    return logits


def _check_no_attention_dropout(model: torch.nn.Module) -> None:
    """Attention dropout applied inside the attention function (not an `nn.Dropout`, which TRL's disable_dropout
    zeroes) would make the student's train-mode log-probs noisy against the teacher's: refused."""
    for name, module in model.named_modules():
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, float) and rate > 0.0:
            raise ValueError(
                f"{name or type(model).__name__} has attention_dropout={rate}; with a self-teacher, Delta would carry "
                "dropout noise: load the model with attention_dropout=0.0 in its config"
            )


def _check_plain_lm_head(model: torch.nn.Module) -> None:
    """Distillation builds logits as head(h) / temperature; a model that caps or rescales its logits is refused."""
    config = model.config.get_text_config()
    rescaling = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    for name in rescaling:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"distill_loss needs a plain LM head, but {config.model_type} sets {name}={value}; "
                "use a token-advantage rule (credit=...) for this model"
            )


def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """Completion tokens that enter the loss: the completion mask times TRL's tool mask when present."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def _step_ids(batch: dict[str, Any]) -> torch.Tensor:
    """Index of the assistant segment of each completion token: segments are separated by tool outputs (TRL's
    tool mask is 0 on them); a single-turn completion is one step, 0 everywhere."""
    mask = batch["completion_mask"]
    tool_mask = batch.get("tool_mask")
    if tool_mask is None:
        return torch.zeros_like(mask, dtype=torch.long)
    resumes = (tool_mask[:, 1:] == 1) & (tool_mask[:, :-1] == 0)
    return torch.cat([torch.zeros_like(mask[:, :1]), resumes.long().cumsum(1)], dim=1)


def _check_privileged_column(dataset: Any, column: str, split_name: str) -> None:
    """Fail at construction when the privileged column is missing or holds empty answers."""
    if dataset is None:
        return
    datasets = dataset.values() if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
    for part in datasets:
        names = getattr(part, "column_names", None)
        if names is None:
            continue
        if column not in names:
            raise ValueError(
                f"{split_name} has no privileged column {column!r} (set privileged_column); "
                f"its columns are {sorted(names)}"
            )
        if isinstance(part, Dataset):
            if len(part) == 0:
                raise ValueError(f"{split_name} is empty")
            empty = [i for i, answer in enumerate(part[column]) if is_empty_answer(answer)]
            if empty:
                shown = ", ".join(str(i) for i in empty[:10])
                raise ValueError(
                    f"{split_name} column {column!r} is empty in {len(empty)} row(s): {shown}"
                    + (" ..." if len(empty) > 10 else "")
                )
