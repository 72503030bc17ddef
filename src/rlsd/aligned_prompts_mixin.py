"""`AlignedPromptsMixin`: Rethinking-OPD's teacher-aligned prompt selection (`teacher_aligned_prompts`) for
`RLSDTrainer`, run once at construction. The scores and the choice are pure functions in `rlsd.prompt_selection`;
this mixin gathers the prompts and teacher prompts, runs them through the trainer's student and teacher, and replaces
`train_dataset`. The TRL attributes it reads are in `rlsd.trainer`'s seams table (`tests/test_layout.py` reads both
files)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from trl.models.utils import disable_gradient_checkpointing

from rlsd.privileged import RolloutView
from rlsd.prompt_selection import DEFAULT_OVERLAP_K, alignment_scores, select_aligned
from rlsd.teacher_prompt import render_teacher_prompts

logger = logging.getLogger("rlsd.trainer")  # the trainer's construction messages share one logger


class AlignedPromptsMixin:
    """Keeps the `teacher_aligned_prompts` fraction of the training prompts on which student and teacher agree most;
    sets `prompt_alignment` (every prompt's score) and `aligned_prompt_indices` (the rows kept)."""

    def _select_aligned_prompts(self) -> None:
        """Rethinking-OPD's teacher-aligned prompt selection, reconstructed (`rlsd.prompt_selection`): score every
        training prompt by the mean student-teacher top-k overlap over the student's greedy continuation, the teacher
        shown its training-time prompt, and keep the `teacher_aligned_prompts` fraction with the highest scores as
        `train_dataset` (dataset order, columns unchanged). Every process scores every prompt (a sharded model runs its
        collectives in step) and all use the main process's scores. Set once, at construction."""
        args, dataset = self.args, self.train_dataset
        if not isinstance(dataset, Dataset):
            raise TypeError(f"teacher_aligned_prompts needs a datasets.Dataset to select rows from, got "
                            f"{type(dataset).__name__} (a streaming dataset cannot be ranked up front)")  # fmt: skip
        if self.has_images:
            raise NotImplementedError("teacher_aligned_prompts scores text prompts only; drop the image column or the "
                                      "option")  # fmt: skip
        columns = [name for name in ("prompt", args.privileged_column) if name in dataset.column_names]
        rows = dataset.select_columns(columns).to_list()
        count = len(rows)
        view = RolloutView(rows, 1, 0, [""] * count, [math.nan] * count)  # before training: no sibling succeeded
        context = self.source.context(view, list(range(count)))
        prompts = [row["prompt"] for row in rows]
        teacher_prompts = render_teacher_prompts(prompts, args.teacher_template, context.fields)
        student_ids, _, _ = self._tokenize_prompts(prompts)
        teacher_ids, _, _ = self._tokenize_prompts(teacher_prompts)
        policy = self.accelerator.unwrap_model(self.model)

        @contextlib.contextmanager
        def student() -> Iterator[torch.nn.Module]:
            with disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
                yield policy

        sharded = self.accelerator.num_processes > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        k = args.distill_overlap_k or DEFAULT_OVERLAP_K
        training = policy.training
        policy.eval()
        try:
            scores = alignment_scores(
                student, lambda: self._scoring_model("teacher"), student_ids, teacher_ids, k=k,
                max_new_tokens=args.max_completion_length, pad_token_id=self._tokenizer.pad_token_id,
                eos_token_id=self.eos_token_ids, batch_size=args.per_device_train_batch_size, synced_gpus=sharded,
            )  # fmt: skip
        finally:
            policy.train(training)
        scores = broadcast_object_list([scores.tolist()])[0]
        keep = select_aligned(scores, args.teacher_aligned_prompts)
        self.prompt_alignment = torch.tensor(scores, dtype=torch.float32)
        self.aligned_prompt_indices = keep
        self.train_dataset = dataset.select(keep)
        kept = torch.zeros(count, dtype=torch.bool)
        kept[keep] = True
        dropped = self.prompt_alignment[~kept].mean().item() if (~kept).any() else math.nan
        logger.info("teacher_aligned_prompts=%g: kept %d of %d training prompts; mean top-%d overlap %.4f kept, %.4f "
                    "dropped", args.teacher_aligned_prompts, len(keep), count, k,
                    self.prompt_alignment[kept].mean().item(), dropped)  # fmt: skip
