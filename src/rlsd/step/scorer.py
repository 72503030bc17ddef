"""`Scorer`: the no-grad scoring passes of `RLSDTrainer` (the rule's teacher pass, the re-scoring of a rollout under
the student or SDPG's reference, the loss-time teacher's hidden states, the privileged source's text generator).
The math of a pass is in `rlsd.step.scoring` (prefix sharing) and TRL's own scoring forward (`trl_logps`). The scorer
receives values and callables, never the trainer: the TRL attributes and methods behind them are read where the
trainer builds it (`rlsd.trainer`'s seams table). Every pass picks its module through `scoring_model`; two read full
logits and run their own forward through it: the top-k pass over teacher trajectories (`TeacherRollouts.
trajectory_pass`, BRTS / PBSD) and the greedy overlap scoring of `teacher_aligned_prompts` (once, at construction)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from trl.models.utils import disable_gradient_checkpointing

from rlsd.context import vision
from rlsd.step import generation
from rlsd.step.batch import RLSDEntries
from rlsd.step.scoring import ScoreResult, score_tokens
from rlsd.teachers import Teacher, backbone_and_head

TokenizePrompts = Callable[[list[Any]], tuple[list[list[int]], Any, Any]]
"""TRL's `_tokenize_prompts`: prompts rendered and tokenized as the rollout does -> (ids, images, fields)."""
TrlLogps = Callable[..., tuple[torch.Tensor, torch.Tensor | None, Any]]
"""TRL's own `_get_per_token_logps_and_entropies` (model, input_ids, attention_mask, logits_to_keep, batch_size,
compute_entropy, **vision), bypassing the trainer's override."""


@dataclass(frozen=True, kw_only=True)
class Scorer:
    """The no-grad passes: which module scores (`scoring_model`), the one scoring forward (`score`) and its views
    (`teacher_rows`, `teacher_hidden`, `generate_texts`), and the current mode's group and batch sizes. Built once
    by the trainer from what these read."""

    accelerator: Accelerator
    model: Callable[[], torch.nn.Module]  # the policy as TRL holds it (prepared, maybe wrapped)
    teacher: Teacher | None  # the teacher of kind `args.teacher`, None without one
    reference: Teacher | None  # SDPG's anchor, None without one
    trl_logps: TrlLogps
    temperature: float  # divides the logits of every scoring forward
    gradient_checkpointing_kwargs: dict[str, Any] | None  # the run's, restored after a frozen model's forward
    prefix_sharing: bool  # `teacher_prefix_sharing`
    per_row_context: bool  # the privileged source reads completions or generates: contexts differ within a group
    sharded: bool  # FSDP or DeepSpeed: parameters are gathered collectively in each forward
    group_sizes: tuple[int, int]  # completions per prompt (training, evaluation)
    batch_sizes: tuple[int, int]  # TRL's per-device batch (training, evaluation)
    training: Callable[[], bool]  # whether the policy is in training mode
    tokenize_prompts: TokenizePrompts
    tokenizer: Any  # the text tokenizer (pad id, decoding generated texts)
    generation_config: Any  # TRL's `GenerationConfig`: `generate_texts` samples with the run's settings
    eos_token_ids: list[int]  # the ids that end a completion
    served: Callable[..., torch.Tensor] | None = None  # `teacher_backend="vllm"`: the teacher's log-probs from vLLM

    def group_size(self) -> int:
        """Completions per prompt in the current mode."""
        return self.group_sizes[0] if self.training() else self.group_sizes[1]

    def scoring_batch_size(self) -> int:
        """Rows per no-grad scoring forward: TRL's per-device batch of the current mode."""
        return self.batch_sizes[0] if self.training() else self.batch_sizes[1]

    @contextlib.contextmanager
    def scoring_model(self, which: str, owner: Teacher | None = None) -> Iterator[torch.nn.Module]:
        """The module that scores for `which`: the teacher's (or `owner`'s, one of MAD-OPD's teachers) or the
        reference's weights (a copy, an adapter, or the policy itself) with gradient checkpointing off, or the
        student."""
        model = self.model()
        if which == "student":
            yield model
            return
        owner = owner or (self.teacher if which == "teacher" else self.reference)
        policy = self.accelerator.unwrap_model(model)
        with (
            disable_gradient_checkpointing(model, self.gradient_checkpointing_kwargs),
            owner.forward_context(model, policy) as scoring,
        ):
            yield scoring

    @torch.no_grad()
    def score(
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
        (`rlsd.step.scoring.score_tokens`, when `prefix_sharing`)."""
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        if rows is not None:
            completion_ids, completion_mask = completion_ids[rows], completion_mask[rows]
        if which == "teacher" and self.served is not None:  # one log-prob per token, no entropy (checked by config)
            return ScoreResult(self.served(prompt_ids, prompt_mask, completion_ids, completion_mask))
        with self.scoring_model(which) as model:
            if which == "teacher" and self._shares_prefixes(model_kwargs, rows, batch["completion_ids"].size(0)):
                with self.accelerator.autocast():  # as TRL's scoring forward: same precision as the plain pass
                    return score_tokens(
                        self.accelerator.unwrap_model(model), prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=self.temperature, batch_size=self.scoring_batch_size(), with_entropy=entropy,
                        group_size=self.group_size(), fused_head=True,
                    )  # fmt: skip
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            logps, entropies, _ = self.trl_logps(
                model, input_ids, attention_mask, completion_ids.size(1),
                batch_size=self.scoring_batch_size(), compute_entropy=entropy, **model_kwargs,
            )  # fmt: skip
        return ScoreResult(logps, entropies if entropy else None)

    def rescore(self, which: str, output: dict[str, Any]) -> ScoreResult:
        """The log-probs of a rollout's completions after the student's own prompts under `which` ("student" or
        "reference"), with the rollout's vision inputs (the re-scoring passes)."""
        kwargs = vision.student_vision_kwargs(output)
        return self.score(which, output["prompt_ids"], output["prompt_mask"], output, kwargs)

    def _shares_prefixes(self, model_kwargs: dict[str, Any], rows: torch.Tensor | None, local_rows: int) -> bool:
        """Prefix sharing applies to text rows that form whole groups in TRL's order (all rows, or a subset of whole
        groups; this process's rows must not start or end inside a group), on a plain (not sharded) model, with a
        source whose context is the same for a whole group, when the config allows it."""
        group = self.group_size()
        return (
            self.prefix_sharing
            and local_rows % group == 0
            and (self.accelerator.process_index * local_rows) % group == 0
            and not model_kwargs
            and (rows is None or whole_groups(rows, self.group_size()))
            and not self.per_row_context
            and not self.sharded
            and self.group_size() > 1
        )

    def teacher_rows(
        self,
        output: dict[str, Any],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        types: dict[str, torch.Tensor],
        rows: torch.Tensor | None,
        *,
        entropy: bool,
    ) -> ScoreResult:
        """The teacher's log-probs (and entropy, with `entropy`: the rule of the current stage reads it) of every
        row; with `rows`, only those rows are scored (their prompts were the only ones built) and the others are 0."""
        kwargs = vision.teacher_vision_kwargs(output, types, output["completion_ids"].size(1))
        if rows is None:
            return self.score("teacher", prompt_ids, prompt_mask, output, kwargs, entropy=entropy)
        shape = output["completion_ids"].shape
        logps = torch.zeros(shape, dtype=torch.float32, device=output["completion_ids"].device)
        entropies = torch.zeros_like(logps) if entropy else None
        if rows.numel() == 0:
            return ScoreResult(logps, entropies)
        scored = self.score("teacher", prompt_ids, prompt_mask, output, kwargs, entropy=entropy, rows=rows)
        logps = logps.to(scored.logps.dtype).index_copy(0, rows, scored.logps)
        if entropies is not None:
            entropies = entropies.to(scored.entropy.dtype).index_copy(0, rows, scored.entropy)
        return ScoreResult(logps, entropies)

    @torch.no_grad()
    def teacher_hidden(
        self,
        inputs: dict[str, Any],
        entries: RLSDEntries,
        owner: Teacher | None = None,
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
        with self.scoring_model("teacher", owner) as teacher_model, self.accelerator.autocast():
            backbone, head = backbone_and_head(self.accelerator.unwrap_model(teacher_model))
            if with_logps or kwargs or self.sharded:
                with captured_output(backbone) as hidden:
                    logps, _, _ = self.trl_logps(teacher_model, input_ids, attention_mask, completion_ids.size(1),
                                                 **kwargs)  # fmt: skip
                states = torch.cat(hidden)
            else:
                output = backbone(input_ids=input_ids, attention_mask=attention_mask)
                states = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return (states[:, -completion_ids.size(1) - 1 : -1], head), (logps if with_logps else None)

    def generate_texts(self, prompts: list[Any], model: str = "policy") -> list[str]:
        """`RolloutView.generate`: complete `prompts` with the policy's or the teacher's current weights, in eval mode
        and without gradient checkpointing, under the run's generation config."""
        which = "teacher" if model == "teacher" else "student"
        with self.scoring_model(which) as module:
            unwrapped = self.accelerator.unwrap_model(module)
            training = unwrapped.training
            unwrapped.eval()
            try:
                return generation.generate_texts(
                    unwrapped, prompts, tokenize_prompts=self.tokenize_prompts,
                    pad_token_id=self.tokenizer.pad_token_id,
                    decode=lambda rows: self.tokenizer.batch_decode(rows, skip_special_tokens=True),
                    generation_config=self.generation_config, eos_token_ids=self.eos_token_ids,
                    synced_gpus=self.sharded,
                )  # fmt: skip
            finally:
                unwrapped.train(training)


def whole_groups(rows: torch.Tensor, group_size: int) -> bool:
    """True when `rows` lists whole groups of consecutive rows, each in order (the teacher's rows after the skip of
    A_i = 0 usually are: a group's completions all have A_i = 0, or, with binary rewards, none has)."""
    if rows.numel() == 0 or rows.numel() % group_size:
        return False
    blocks = rows.view(-1, group_size)
    starts = blocks[:, :1]
    offsets = torch.arange(group_size, device=rows.device)
    return bool((starts % group_size == 0).all() and (blocks == starts + offsets).all())


@contextlib.contextmanager
def captured_output(module: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Collect the last hidden state of every forward of `module` (a backbone) while the context is open, graph
    included; None captures nothing (the loss captures the student's hidden states with it too)."""
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
