"""`select_aligned_prompts`: Rethinking-OPD's teacher-aligned prompt selection (`teacher_aligned_prompts`), run once
while `RLSDTrainer` is built. The scores and the choice are pure functions in `rlsd.core.prompt_selection`; this
function gathers the prompts and teacher prompts, runs them through the student and the teacher it is handed and
returns the selected rows. It receives values and callables, never the trainer; the trainer assigns the result to
`train_dataset` (a row of `rlsd.trainer`'s seams table)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from torch import Tensor, nn
from trl.models.utils import disable_gradient_checkpointing

from rlsd.config import RLSDConfig
from rlsd.context.sources import PrivilegedSource, RolloutView
from rlsd.context.templates import render_teacher_prompts
from rlsd.core.prompt_selection import DEFAULT_OVERLAP_K, ModelScope, alignment_scores, select_aligned

logger = logging.getLogger("rlsd.trainer")  # the trainer's construction messages share one logger

TokenizePrompts = Callable[[list[Any]], tuple[list[list[int]], Any, Any]]
"""TRL's `_tokenize_prompts`: prompts rendered and tokenized as the rollout does -> (ids, images, fields)."""
Broadcast = Callable[[list[Any]], list[Any]]
"""`accelerate.utils.broadcast_object_list`: every process gets the main process's objects."""


class AlignedSelection(NamedTuple):
    """The kept rows (dataset order, columns unchanged), every original prompt's score ((N,) float32), the kept
    indices."""

    dataset: Dataset
    scores: Tensor
    keep: list[int]


def select_aligned_prompts(
    dataset: Any,
    args: RLSDConfig,
    *,
    source: PrivilegedSource,
    has_images: bool,
    tokenize_prompts: TokenizePrompts,
    model: nn.Module,
    policy: nn.Module,
    teacher: ModelScope,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    synced_gpus: bool,
    broadcast: Broadcast = broadcast_object_list,
) -> AlignedSelection:
    """Score every prompt of `dataset` by the mean student-teacher top-k overlap over the student's greedy
    continuation (the teacher shown its training-time prompt) and keep the `args.teacher_aligned_prompts` fraction
    with the highest scores. `policy` is the student (`model` unwrapped: gradient checkpointing is switched off on
    `model` and the policy put in eval mode meanwhile); every process scores every prompt (`synced_gpus`: a sharded
    model runs its collectives in step) and all use the main process's scores (`broadcast`)."""
    check_rankable(dataset, has_images)
    student_ids, teacher_ids = prompt_pairs(dataset, args, source, tokenize_prompts)

    @contextlib.contextmanager
    def student() -> Iterator[nn.Module]:
        with disable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs):
            yield policy

    k = args.distill_overlap_k or DEFAULT_OVERLAP_K
    training = policy.training
    policy.eval()
    try:
        scores = alignment_scores(
            student, teacher, student_ids, teacher_ids, k=k, max_new_tokens=args.max_completion_length,
            pad_token_id=pad_token_id, eos_token_id=eos_token_id, batch_size=args.per_device_train_batch_size,
            synced_gpus=synced_gpus,
        )  # fmt: skip
    finally:
        policy.train(training)
    shared = broadcast([scores.tolist()])[0]
    keep = select_aligned(shared, args.teacher_aligned_prompts)
    selection = AlignedSelection(dataset.select(keep), torch.tensor(shared, dtype=torch.float32), keep)
    log_selection(selection, args.teacher_aligned_prompts, k)
    return selection


def check_rankable(dataset: Any, has_images: bool) -> None:
    """Refuse what cannot be ranked up front: a dataset without random access, or image prompts."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"teacher_aligned_prompts needs a datasets.Dataset to select rows from, got "
                        f"{type(dataset).__name__} (a streaming dataset cannot be ranked up front)")  # fmt: skip
    if has_images:
        raise NotImplementedError("teacher_aligned_prompts scores text prompts only; drop the image column or the "
                                  "option")  # fmt: skip


def prompt_pairs(
    dataset: Dataset, args: RLSDConfig, source: PrivilegedSource, tokenize_prompts: TokenizePrompts
) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids of every prompt as the student and as the teacher sees it in training; before training no
    rollout exists, so the source sees empty completions and no sibling succeeded."""
    columns = [name for name in ("prompt", args.privileged_column) if name in dataset.column_names]
    rows = dataset.select_columns(columns).to_list()
    count = len(rows)
    view = RolloutView(rows, 1, 0, [""] * count, [math.nan] * count)
    context = source.context(view, list(range(count)))
    prompts = [row["prompt"] for row in rows]
    teacher_prompts = render_teacher_prompts(prompts, args.teacher_template, context.fields)
    return tokenize_prompts(prompts)[0], tokenize_prompts(teacher_prompts)[0]


def log_selection(selection: AlignedSelection, fraction: float, k: int) -> None:
    """One line: how many prompts were kept and the mean score of the kept and the dropped ones."""
    kept = torch.zeros(len(selection.scores), dtype=torch.bool)
    kept[selection.keep] = True
    dropped = selection.scores[~kept].mean().item() if (~kept).any() else math.nan
    logger.info("teacher_aligned_prompts=%g: kept %d of %d training prompts; mean top-%d overlap %.4f kept, %.4f "
                "dropped", fraction, len(selection.keep), len(selection.scores), k,
                selection.scores[kept].mean().item(), dropped)  # fmt: skip
