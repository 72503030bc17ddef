"""`TeacherPrompts`: what the teacher is shown, built from a rollout. The privileged source fills the teacher template
of each row from what the rollout used and scored (`RolloutTap`); the teacher transform, if any, rewrites the prompt
and images; the result is tokenized and left-padded (`TeacherInputs`). Built by `RLSDTrainer` from values and
callables, never the trainer: the TRL attributes and methods behind them are read where the trainer builds it
(`rlsd.trainer`'s seams table)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from rlsd.context import vision
from rlsd.context.annotation import completion_token_labels
from rlsd.context.sources import Context, PrivilegedSource, RolloutView, TextGenerator
from rlsd.context.templates import has_image_blocks, render_teacher_prompts
from rlsd.context.transforms import apply_transform
from rlsd.step.turns import turn_index

TokenizePrompts = Callable[[list[Any]], tuple[list[list[int]], Any, Any]]
"""TRL's `_tokenize_prompts`: prompts rendered and tokenized as the rollout does -> (ids, images, fields)."""


@dataclasses.dataclass
class RolloutTap:
    """What TRL's rollout used and scored, handed to this trainer's rollout by `_calculate_rewards` while it runs:
    this process's prompts as the rollout sent them to the model (an environment's `reset` observation included),
    and the weighted total rewards of every process's rows (B_global,), NaN where every function abstained. The
    teacher prompts built from it record the source's per-row distillation weights (`Context.row_weights`), None
    when the source gives none, and its per-token labels (`Context.char_spans` mapped to the completion tokens),
    None when it gives none."""

    prompts: list[Any] | None = None
    rewards: torch.Tensor | None = None
    row_weights: torch.Tensor | None = None  # (B,) this process's rows
    token_labels: torch.Tensor | None = None  # (B, T) this process's rows, 0 outside every span


class TeacherInputs(NamedTuple):
    """The teacher prompts of a rollout's scored rows, left-padded (ids, mask, token types by processor key), and
    which of all its rows have privileged context."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    token_types: dict[str, torch.Tensor]
    has_context: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class TeacherPrompts:
    """The teacher prompts of a rollout's rows (`build`): privileged context, transform, template, tokens. Built once
    by the trainer from what these read; the group size and the config's teacher users are read at each call."""

    accelerator: Accelerator
    source: PrivilegedSource  # the run's privileged source: fills the template fields of each row
    teacher_template: str  # the template the fields fill (`RLSDConfig.teacher_template`)
    teacher_transform: str | None  # what the teacher sees instead of the student's input (`rlsd.context.transforms`)
    privileged_source: str  # the source's name, for error messages
    tokenizer: Any  # the text tokenizer (pad id, decoding the completions a source reads)
    tokenize_prompts: TokenizePrompts
    is_vlm: bool  # whether the processing class is a processor (images allowed)
    image_pad_token_id: int | None  # the image-pad token id: teacher and student prompts must hold as many
    processing_class: Any  # its `image_processor` processes the images a transform shows the teacher
    group_size: Callable[[], int]  # completions per prompt in the current mode
    generate: TextGenerator  # `RolloutView.generate`, for a source that `needs_generator`
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    teacher_use: Callable[[], str]  # what in the config (of the active stage) uses the teacher, for error messages
    context_length: int | None = None  # the model's context: [teacher prompt ; completion] must fit it

    def build(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        mode: str = "train",
        rows: torch.Tensor | None = None,
        rollout: RolloutTap | None = None,
        *,
        distill: bool = False,
        context: Context | None = None,
    ) -> TeacherInputs:
        """The teacher prompts of `rows` (all rows when None) from the privileged source, tokenized and left-padded
        (ids, mask, token types for vision models), and which of all the rows have privileged context. Rows outside
        `rows` are neither rendered nor tokenized. The teacher's prompt is built from the prompt the rollout used
        (`rollout.prompts`; the dataset rows' without it), and a source that reads rewards gets `rollout.rewards`.
        `distill`: whether the active stage has a distillation loss (its teacher pass runs at loss time). `context`:
        the fields of `rows` to render instead of the source's `context` (a contrastive source's negatives)."""
        rollout = rollout or RolloutTap()
        selected = list(range(len(inputs))) if rows is None else rows.tolist()
        if context is None:
            view = self.rollout_view(inputs, output, rollout.rewards, mode)
            context = self.source.context(view, selected)
            self.source.remember(view, selected, context)
        self.log(mode, context.metrics)
        device = self.accelerator.device
        if context.row_weights is not None:  # rows outside `rows` keep 1
            rollout.row_weights = torch.ones(len(inputs), dtype=torch.float32, device=device)
            rollout.row_weights[selected] = torch.tensor(context.row_weights, dtype=torch.float32, device=device)
        if context.char_spans is not None:
            rollout.token_labels = self.token_labels(output, selected, context.char_spans)
        has_context = torch.ones(len(inputs), dtype=torch.bool, device=device)
        has_context[selected] = torch.tensor(context.has_context, dtype=torch.bool, device=device)
        images = vision.batch_images(inputs)
        # the prompt the rollout used (an environment's observation included); with images, the dataset row's, whose
        # image blocks are placed below as TRL places them (the rollout's carry the student's image payloads)
        used = rollout.prompts if rollout.prompts is not None and images is None else [row["prompt"] for row in inputs]
        prompts = [used[i] for i in selected]
        if images is None and any(has_image_blocks(prompt) for prompt in prompts):
            raise ValueError(vision.IMAGE_BLOCKS_ERROR.format(where="a rollout batch"))
        if images is not None and not self.is_vlm:
            raise ValueError(vision.TOKENIZER_WITH_IMAGES_ERROR.format(what=self.teacher_use()))
        row_images = [images[i] for i in selected] if images is not None else [None] * len(selected)
        if self.teacher_transform is not None:  # what the teacher sees instead of the student's input
            prompts, row_images = self.transformed(prompts, row_images, inputs, selected)
        if images is not None:  # the prompts TRL rolled out: image blocks placed as TRL places them
            prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, row_images, strict=True)]
        teacher_prompts = render_teacher_prompts(prompts, self.teacher_template, context.fields)
        if not teacher_prompts:  # no row needs the teacher
            empty = torch.zeros(0, 0, dtype=torch.long, device=device)
            return TeacherInputs(empty, empty, {}, has_context)
        prompt_ids_list, _, fields = self.tokenize_prompts(teacher_prompts)
        self.check_lengths(prompt_ids_list, selected)
        self.check_context(prompt_ids_list, selected, output)
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = pad([torch.tensor(ids) for ids in prompt_ids_list], padding_value=pad_id, padding_side="left")
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids_list], padding_value=0,
                          padding_side="left")  # fmt: skip
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        if images is not None:
            types = self.token_types(fields, prompt_ids, output)
        else:  # zeros for the keys a tool's images in the completion need, else none
            types = self.no_image_types(output, prompt_ids)
        if images is not None and self.teacher_transform is not None:  # the teacher's own images, processed
            flat = [image for row in row_images if row for image in row]  # as TRL processes the student's
            processed = self.processing_class.image_processor(images=flat, return_tensors="pt")
            processed = {key: value for key, value in processed.items() if key in vision.IMAGE_KEYS}
            if distill:  # they travel to the loss-time teacher pass with their rows, through TRL's split by rows
                processed = vision.rows_first(processed, [len(row or []) for row in row_images])
            types.update({key: value.to(device) for key, value in processed.items()})
        return TeacherInputs(prompt_ids, prompt_mask, types, has_context)

    def negatives(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        mode: str = "train",
        rows: torch.Tensor | None = None,
        rollout: RolloutTap | None = None,
    ) -> list[TeacherInputs]:
        """The teacher prompts of `rows` after each of a contrastive source's negative contexts
        (`negative_contexts`, RLCSD's wrong siblings: one `TeacherInputs` per slot, the same template), their
        `has_context` marking the rows that have a negative in that slot. A source without negatives is refused."""
        negative_contexts = getattr(self.source, "negative_contexts", None)
        if negative_contexts is None:
            raise ValueError(
                f"privileged_source={self.privileged_source!r} gives no negative contexts, which the credit rule "
                "reads (teacher_contrast_logps): use privileged_source='contrast'"
            )
        rollout = rollout or RolloutTap()
        selected = list(range(len(inputs))) if rows is None else rows.tolist()
        contexts = negative_contexts(self.rollout_view(inputs, output, rollout.rewards), selected)
        return [self.build(inputs, output, mode, rows, rollout, context=context) for context in contexts]

    def token_labels(
        self, output: dict[str, Any], rows: list[int], spans: list[list[tuple[int, int, int]]]
    ) -> torch.Tensor:
        """The (B, T) labels of the completion tokens: each of `rows` labelled from its character spans of the
        completion text the source read (`rlsd.context.annotation.completion_token_labels`), 0 elsewhere."""
        ids, keep = output["completion_ids"], output["completion_mask"].bool()
        labels = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
        for row, row_spans in zip(rows, spans, strict=True):
            if row_spans:
                positions = keep[row].nonzero().squeeze(1)
                values = completion_token_labels(self.tokenizer, ids[row][positions].tolist(), row_spans)
                labels[row, positions] = torch.tensor(values, dtype=torch.long, device=ids.device)
        return labels

    def check_lengths(self, prompt_ids: list[list[int]], rows: list[int]) -> None:
        """Refuse a teacher prompt longer than the source allows (`max_prompt_tokens`), naming the row: a generated
        context is never silently truncated."""
        limit = self.source.max_prompt_tokens()
        for row, ids in zip(rows, prompt_ids, strict=True):
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"privileged source {self.privileged_source!r}: the teacher prompt of rollout row {row} is "
                    f"{len(ids):,} tokens, over the source's limit of {limit:,} (context_max_tokens); raise the "
                    "limit or shorten the context"
                )

    @staticmethod
    def no_image_types(output: dict[str, Any], prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The token types of teacher prompts without images (zeros) for the keys the rollout carries: a tool's
        images in the completion (TRL's tool loop), whose types `vision.teacher_vision_kwargs` appends; else none."""
        return {key: torch.zeros_like(prompt_ids) for key in vision.TOKEN_TYPE_KEYS if output.get(key) is not None}

    def check_context(self, prompt_ids: list[list[int]], rows: list[int], output: dict[str, Any]) -> None:
        """Refuse a teacher input [teacher prompt ; completion] longer than the model's context (`context_length`),
        naming the row and the completion turn it runs past the context in: TRL keeps the student's input (and its
        tool results) within the context, but the privileged context lengthens the teacher's, whose last tokens would
        be scored at positions the model never had; never truncated."""
        limit, completions = self.context_length, output.get("completion_ids")
        if limit is None or completions is None:
            return
        keep = output.get("completion_mask")
        lengths = keep.sum(1).tolist() if keep is not None else [len(completion) for completion in completions]
        tool_mask = output.get("tool_mask")
        for row, ids in zip(rows, prompt_ids, strict=True):
            completion = int(lengths[row])
            if len(ids) + completion <= limit:
                continue
            position = limit - len(ids)  # the first completion token past the context
            turn = turn_index(tool_mask[row].tolist(), position) if tool_mask is not None and position >= 0 else 0
            where = "the teacher prompt itself" if position < 0 else f"completion token {position} (turn {turn})"
            prompt_mask = output.get("prompt_mask")
            student = "" if prompt_mask is None else f"; the student's is {int(prompt_mask[row].sum()) + completion:,}"
            raise ValueError(
                f"the teacher's input of rollout row {row} is {len(ids) + completion:,} tokens (teacher prompt "
                f"{len(ids):,} + completion {completion:,}{student}), over the model's context "
                f"of {limit:,} (max_position_embeddings) from {where}; shorten the privileged context or the teacher "
                "template, or lower max_completion_length"
            )

    def transformed(
        self, prompts: list[Any], images: list[Any], inputs: list[dict[str, Any]], rows: list[int]
    ) -> tuple[list[Any], list[Any]]:
        """The prompt and images of each of `rows` after `teacher_transform` (a box transform reads the row's box from
        `inputs`, naming the rollout row in errors)."""
        name = self.teacher_transform
        pairs = [apply_transform(name, prompt, row_images, inputs[row], f"rollout row {row}")
                 for prompt, row_images, row in zip(prompts, images, rows, strict=True)]  # fmt: skip
        return [prompt for prompt, _ in pairs], [row for _, row in pairs]

    def rollout_view(
        self, inputs: list[dict[str, Any]], output: dict[str, Any], rewards: torch.Tensor | None, mode: str = "train"
    ) -> RolloutView:
        """What the privileged source may read; completion texts and rewards are gathered over processes only for
        a source that reads them (a collective: every process builds the view for the same batches)."""
        group_size = self.group_size()
        generate = self.generate if self.source.needs_generator else None
        if not self.source.needs_completions:
            return RolloutView(inputs, group_size, generate=generate, mode=mode)
        ids, keep = output["completion_ids"], output["completion_mask"]
        texts = self.tokenizer.batch_decode(
            [row[mask.bool()] for row, mask in zip(ids, keep, strict=True)], skip_special_tokens=True
        )
        offset = self.accelerator.process_index * len(texts)
        if rewards is None:
            raise ValueError(f"privileged_source={self.privileged_source!r} reads the rollout's rewards: pass "
                             "the weighted totals (`rewards`) with the rollout")  # fmt: skip
        return RolloutView(inputs, group_size, offset, gather_object(texts), rewards.tolist(), generate, mode)

    def token_types(
        self, fields: dict[str, Any], prompt_ids: torch.Tensor, output: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The processor's token-type ids of the teacher prompts (left-padded like the ids), after checking that
        each teacher prompt holds as many image tokens as the student's."""
        pad_id = self.image_pad_token_id
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
