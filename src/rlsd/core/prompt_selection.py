"""Teacher-aligned prompt selection (`RLSDConfig.teacher_aligned_prompts`): pure torch, no TRL.

Rethinking On-Policy Distillation (arXiv 2604.13016) finds that on-policy distillation works when teacher and
student share thinking patterns, measured by the overlap of their top-k next-token sets at the states the student
visits, and recovers failing OPD by "teacher-aligned prompt selection": training on prompts from the teacher's own
post-training distribution. That distribution is usually not available, so this module is the project's
reconstruction of the idea without it: each training prompt is scored by the teacher-student alignment the paper
measures, and only the most aligned fraction of the prompts is trained on.

Score of a prompt: the mean over the tokens y_1..y_n of the student's greedy continuation of the prompt (at most
`max_new_tokens` new tokens, up to and including the first end-of-sequence token) of

    |TopK(p_S(. | prompt, y_<t)) & TopK(p_T(. | teacher prompt, y_<t))| / k

(`rlsd.core.distill.topk_overlap`), i.e. the overlap at student-visited states, with the teacher conditioned on the
prompt it sees in training. Cost: one greedy generation and two forwards (student, teacher) per prompt.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from rlsd.core.distill import topk_overlap

DEFAULT_OVERLAP_K = 16
"""k of the overlap when `distill_overlap_k` is 0 (the logged diagnostic off): its default."""
ModelScope = Callable[[], AbstractContextManager[nn.Module]]
"""A context that yields the module to run (e.g. a teacher adapter switched on for the duration)."""


def select_aligned(scores: Sequence[float] | Tensor, fraction: float) -> list[int]:
    """The indices of the `fraction` most aligned prompts, in increasing index order.

    Keeps ceil(fraction * N) prompts, at least 1 (fraction in (0, 1]); the highest scores first, ties broken by the
    lower index, so the choice is deterministic. NaN scores rank last.
    """
    values = [float(s) for s in (scores.tolist() if isinstance(scores, Tensor) else scores)]
    if not values:
        raise ValueError("select_aligned needs at least one score")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    keep = max(1, math.ceil(fraction * len(values) - 1e-9))  # 1e-9: 0.3 * 10 is 3.0000000000000004
    order = sorted(range(len(values)), key=lambda i: (-_rank_value(values[i]), i))
    return sorted(order[:keep])


def _rank_value(score: float) -> float:
    """NaN ranks below every number."""
    return -math.inf if math.isnan(score) else score


@torch.no_grad()
def alignment_scores(
    student: nn.Module | ModelScope,
    teacher: nn.Module | ModelScope,
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    batch_size: int = 8,
    synced_gpus: bool = False,
) -> Tensor:
    """Each prompt's mean top-k overlap of student and teacher over the student's greedy continuation, (N,) float.

    `student_prompts[i]` and `teacher_prompts[i]` are the token ids of prompt i as the student and the teacher see it
    in training. Per batch of `batch_size` prompts (left-padded): the student generates greedily (argmax, no
    sampling knob of the model's generation config applies) at most `max_new_tokens` tokens; the student then scores
    [prompt ; continuation] and the teacher [teacher prompt ; continuation], both with plain logits at the
    continuation positions only; the overlap of their top-k sets (k capped at the vocabulary) is averaged over the
    continuation's tokens, up to and including its first `eos_token_id`. A model may be given as a `ModelScope`
    (entered around its own work, e.g. to switch an adapter). `synced_gpus`: pass True when the student is sharded
    over processes (every process then generates the same number of steps). No gradient; models run as given
    (put them in eval mode first).
    """
    if len(student_prompts) != len(teacher_prompts):
        raise ValueError(f"{len(student_prompts)} student prompts but {len(teacher_prompts)} teacher prompts")
    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"k, max_new_tokens and batch_size must be >= 1, got {k}, {max_new_tokens}, {batch_size}")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    generation = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
        eos_token_id=eos or None,
    )  # fmt: skip
    scores = []
    for start in range(0, len(student_prompts), batch_size):
        rows = slice(start, start + batch_size)
        with _scope(student) as model:
            device = _device(model)
            ids, mask = left_pad(student_prompts[rows], pad_token_id, device)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation,
                                    synced_gpus=synced_gpus)  # fmt: skip
            continuation = output[:, ids.size(1) :]
            keep = continuation_mask(continuation, eos)
            student_logits = completion_logits(model, ids, mask, continuation, keep)
        with _scope(teacher) as model:
            teacher_ids, teacher_mask = left_pad(teacher_prompts[rows], pad_token_id, _device(model))
            teacher_logits = completion_logits(model, teacher_ids, teacher_mask, continuation.to(teacher_ids.device),
                                               keep.to(teacher_ids.device))  # fmt: skip
        overlap = topk_overlap(student_logits.float(), teacher_logits.to(student_logits.device).float(), k)
        weights = keep.to(overlap.device, overlap.dtype)
        scores.append((overlap * weights).sum(1) / weights.sum(1).clamp(min=1.0))
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id lists left-padded into (B, L) ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def continuation_mask(continuation: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """(B, T) 1 on the generated tokens up to and including the first end-of-sequence token of each row (the rest
    is padding), whatever the pad id is (it may equal an end-of-sequence id)."""
    if not eos_token_ids:
        return torch.ones_like(continuation)
    is_eos = torch.isin(continuation, torch.tensor(list(eos_token_ids), device=continuation.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first end-of-sequence token
    return (~after_eos).long()


def completion_logits(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor,
                      completion_mask: Tensor) -> Tensor:  # fmt: skip
    """(B, T, V) plain next-token logits of `model` at the T completion positions of [prompt ; completion]: the
    logits that predict each completion token (only the last T + 1 positions are projected)."""
    input_ids = torch.cat([prompt_ids, completion], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    length = completion.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1).logits
    return logits[:, -length - 1 : -1]


def _scope(model: nn.Module | ModelScope) -> AbstractContextManager[nn.Module]:
    return contextlib.nullcontext(model) if isinstance(model, nn.Module) else model()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
