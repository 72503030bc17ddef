"""`RLSDTrainer`: TRL's `GRPOTrainer` with token-level credit from a privileged self-teacher.

The trainer only gathers log-probs and hands (B, T) token advantages to TRL's own loss:
1. after TRL's rollout and scoring, one no-grad teacher forward on [teacher prompt ; completion];
2. the student's sampled-token log-probs are TRL's old log-probs when TRL computes them, else the detached
   log-probs of the loss's own forward (no extra pass);
3. `rlsd.credit` turns (A_i, teacher, student, mask) into A_it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from typing import Any, ClassVar

import torch
from datasets import Dataset, IterableDatasetDict
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import pad

from rlsd.config import RLSDConfig
from rlsd.credit import grpo_advantages, rlsd_lambda
from rlsd.rewards import guard_reward
from rlsd.rules import AntiSDGate, RuleParams, Signals, get_rule
from rlsd.teacher import SelfTeacher, TeacherSyncCallback
from rlsd.teacher_prompt import is_empty_answer, render_teacher_prompts, validate_teacher_template

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
        validate_teacher_template(args.teacher_template)
        self.rule = get_rule(args.credit)
        self.uses_teacher = "teacher_logps" in self.rule.needs
        if self.uses_teacher:
            if args.remove_unused_columns:
                raise ValueError(
                    f"remove_unused_columns=True would drop the privileged column {args.privileged_column!r}; "
                    "set it to False"
                )
            for split_name in ("train_dataset", "eval_dataset"):
                _check_privileged_column(kwargs.get(split_name), args.privileged_column, split_name)
        super().__init__(model, _guard_rewards(reward_funcs), args=args, **kwargs)

        self._deferred_credit: dict[str, Any] | None = None
        self.antisd_gate = AntiSDGate(args.antisd_warmup_steps, args.antisd_ratio) if args.credit == "antisd" else None
        self.teacher: SelfTeacher | None = None
        if self.uses_teacher:
            policy = self.accelerator.unwrap_model(self.model)
            self.teacher = SelfTeacher(
                args.teacher,
                policy,
                sync_steps=args.teacher_sync_steps,
                ema_decay=args.teacher_ema_decay,
                temperature=self.temperature,
                with_entropy="teacher_entropy" in self.rule.needs,
            )
            if self.teacher.model is not None:
                self.teacher.model = self._prepare_frozen_model(self.teacher.model)
            if args.teacher in ("synced", "ema"):
                self.add_callback(TeacherSyncCallback(self))

    # ----------------------------------------------------------------------------------------------- set-up
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
        if not self.uses_teacher:
            return False
        if self.rule.grpo_when_lambda_zero:
            return lam > 0.0 and self.args.rlsd_clip > 0.0
        return True

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout and scoring, then the teacher pass and (B, T) token advantages."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(output)
        lam = self._current_lambda() if self.uses_teacher else 0.0
        if self.uses_teacher:
            self._metrics[mode]["rlsd/lambda"].append(lam)
        if not self._teacher_pass_needed(lam):
            output["advantages"], _ = grpo_advantages(output["advantages"], mask)
            if self.uses_teacher:
                self._metrics[mode]["rlsd/teacher_time_s"].append(0.0)
            return output

        start = time.perf_counter()
        teacher_logps, teacher_entropy = self._teacher_logps(inputs, output)
        self._metrics[mode]["rlsd/teacher_time_s"].append(time.perf_counter() - start)
        gate = self._antisd_gate_value(teacher_entropy, mask) if self.antisd_gate is not None else 1.0
        pending = {
            "rlsd_seq_advantages": output["advantages"],
            "rlsd_teacher_logps": teacher_logps,
            "rlsd_lambda": torch.tensor(lam, dtype=torch.float64),
            "rlsd_gate": torch.tensor(gate, dtype=torch.float64),
        }
        if teacher_entropy is not None:
            pending["rlsd_teacher_entropy"] = teacher_entropy
        student_logps = output.get("old_per_token_logps")
        if student_logps is None and "group_ids" in self.rule.needs:
            student_logps = self._score_rollout(output)  # group statistics need every completion of a group now
        if student_logps is not None:  # the credit is final at rollout time
            output["advantages"] = self._token_advantages({**output, **pending}, student_logps, mode)
            return output
        output.update(pending)
        return output

    def _antisd_gate_value(self, teacher_entropy: torch.Tensor, mask: torch.Tensor) -> float:
        """Feed the batch's mean teacher entropy (over all processes) to AntiSD's gate."""
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
            batch_size=self.args.per_device_train_batch_size,
        )  # fmt: skip
        return logps

    @torch.no_grad()
    def _teacher_logps(
        self, inputs: list[dict[str, Any]], output: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tau_t (and the teacher's entropy when the rule needs it): one no-grad forward on
        [teacher prompt ; completion ids], chunked by the per-device batch."""
        column = self.args.privileged_column
        missing = [i for i, row in enumerate(inputs) if column not in row]
        if missing:
            raise KeyError(
                f"rollout row {missing[0]} has no privileged column {column!r}; it has {sorted(inputs[missing[0]])}"
            )
        teacher_prompts = render_teacher_prompts(
            [row["prompt"] for row in inputs], [row[column] for row in inputs], self.args.teacher_template
        )
        prompt_ids_list, _, _ = self._tokenize_prompts(teacher_prompts)
        device = self.accelerator.device
        prompt_ids = pad(
            [torch.tensor(ids) for ids in prompt_ids_list],
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
        ).to(device)
        prompt_mask = pad(
            [torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids_list], padding_value=0, padding_side="left"
        ).to(device)
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
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
                batch_size=batch_size,
                compute_entropy="teacher_entropy" in self.rule.needs,
            )
        return logps, entropy

    # ------------------------------------------------------------------------------------------------ credit
    def _token_advantages(self, batch: dict[str, Any], student_logps: torch.Tensor, mode: str) -> torch.Tensor:
        """Apply the configured rule to a batch carrying the `rlsd_*` entries; log its metrics under `rlsd/`."""
        args = self.args
        mask = _loss_mask(batch)
        signals = Signals(
            seq_advantages=batch["rlsd_seq_advantages"],
            mask=mask,
            teacher_logps=batch["rlsd_teacher_logps"],
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
        token_adv, metrics = self.rule.fn(signals, params)
        self._log_across_processes(mode, metrics)
        return token_adv.to(batch["rlsd_seq_advantages"].dtype)

    def _log_across_processes(self, mode: str, metrics: dict[str, float]) -> None:
        """Average each metric over processes (NaN-aware; counts are summed) and append it to TRL's metrics."""
        keys = sorted(metrics)
        local = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        gathered = self.accelerator.gather(local.unsqueeze(0)).view(-1, len(keys))
        for index, key in enumerate(keys):
            column = gathered[:, index]
            value = column.nansum() if key == "nonfinite_count" else column.nanmean()
            if not math.isnan(value.item()):
                self._metrics[mode][f"rlsd/{key}"].append(value.item())

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; when the credit waits for the student log-probs, they come from this forward, detached."""
        if "rlsd_teacher_logps" not in inputs:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # the buffered rollout batch stays untouched for later iterations
        self._deferred_credit = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._deferred_credit = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring forward; inside the loss, it also turns the pending credit into (B, T) advantages."""
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        pending, self._deferred_credit = self._deferred_credit, None
        if pending is not None:
            mode = "train" if self.model.training else "eval"
            pending["advantages"] = self._token_advantages(pending, logps.detach(), mode)
        return logps, entropies, aux_loss

    # ------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
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
        """Resuming restores the teacher together with the optimizer."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.teacher is not None and checkpoint is not None:
            self.teacher.load(checkpoint, self.accelerator.unwrap_model)
        if self.antisd_gate is not None and checkpoint is not None:
            with open(os.path.join(checkpoint, RULE_STATE_FILE)) as f:
                self.antisd_gate.load_state_dict(json.load(f))


def _guard_rewards(reward_funcs: Any) -> Any:
    """Plain reward functions are wrapped so that an exception names the function and the row (`guard_reward`);
    model names, reward models and async functions pass through unchanged."""

    def guard(func: Any) -> Any:
        if isinstance(func, str | torch.nn.Module) or not callable(func) or inspect.iscoroutinefunction(func):
            return func
        return guard_reward(func)

    return [guard(f) for f in reward_funcs] if isinstance(reward_funcs, list) else guard(reward_funcs)


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
