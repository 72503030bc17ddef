"""Privileged-context sources: what the self-teacher is shown beside the student's prompt.

A source is one class registered with `@privileged_source`: the template fields it fills, its default teacher
template, the dataset check it needs at construction, and `context`, which fills those fields for the rows of a
rollout batch (and says which rows have any context at all). `RLSDConfig.privileged_source` selects one by name;
adding a source is one new class, in this file or in the user's code (its new template fields are known from then on).

The context is computed after TRL's rollout and rewards: a source that reads them (`needs_completions`) sees every
completion's text and weighted total reward, and a source that makes its context with a model (`needs_generator`: a
reflection on a failed attempt, a harness's plan, an annotator's marks) gets `RolloutView.generate`, which completes
prompts with the policy or the teacher under the run's generation settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from datasets import Dataset, IterableDatasetDict

from rlsd.context.templates import (
    BOTH_TEACHER_TEMPLATE,
    NO_SIBLING_TEXT,
    PAPER_TEACHER_TEMPLATE,
    SIBLING_TEACHER_TEMPLATE,
    check_template_fields,
    is_empty_answer,
    pick_siblings,
)
from rlsd.core.credit import TokenMean
from rlsd.core.distill import LOSS_KNOBS
from rlsd.core.rules import KNOBS, Knob, declare_knobs


@dataclass(frozen=True)
class RolloutView:
    """What a source may read about one rollout batch. `rows` are this process's dataset rows; with
    `needs_completions`, `completion_texts` and `rewards` (weighted totals) cover every process's rows in TRL's
    gathered order, of which this process's start at `offset`. `mode`: "train" or "eval" (a stateful source updates
    its state on training rollouts only)."""

    rows: Sequence[dict[str, Any]]
    group_size: int
    offset: int = 0
    completion_texts: Sequence[str] | None = None
    rewards: Sequence[float] | None = None
    generate: TextGenerator | None = None  # with `needs_generator`: complete prompts (see `TextGenerator`)
    mode: str = "train"


class TextGenerator(Protocol):
    """Completes prompts (strings or chat messages) with `model` ("policy" or "teacher": its current weights) under
    the run's generation settings, one text per prompt; every process must call it for the same number of batches
    (a sharded model generates collectively)."""

    def __call__(self, prompts: Sequence[Any], model: str = "policy") -> list[str]: ...


@dataclass
class Context:
    """The template fields of every local row (`fields[name][i]`), which rows have privileged context at all, and
    metrics for `rlsd/` (combined over processes by the trainer). `row_weights`: each row's weight in the
    distillation term, multiplying its context mask (None: 1; RESD's batch-success weights). `char_spans`: each
    row's labelled character spans (start, end, label) of its completion text, which the trainer maps to the
    completion's tokens for a loss that routes tokens by label (None: no labels; TRACE's key and error spans)."""

    fields: dict[str, list[Any]]
    has_context: list[bool]
    metrics: dict[str, float] = field(default_factory=dict)
    row_weights: list[float] | None = None
    char_spans: list[list[tuple[int, int, int]]] | None = None


class PrivilegedSource:
    """The interface of a privileged-context source (see the module docstring)."""

    name: ClassVar[str]
    fills: ClassVar[tuple[str, ...]]  # template fields besides {prompt}
    replaces_prompt: ClassVar[bool] = False  # its context stands in for the prompt: the template may omit {prompt}
    default_template: ClassVar[str]
    needs_completions: ClassVar[bool] = False  # the trainer gathers completion texts and rewards for `context`
    needs_generator: ClassVar[bool] = False  # the trainer hands `context` a text generator (`RolloutView.generate`)
    knobs: ClassVar[dict[str, Knob]] = {}  # its own settings, each an `RLSDConfig` field (read as `self.args.<name>`)

    def __init__(self, args: Any) -> None:
        self.args = args

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        """Refuse, at construction, a dataset this source cannot read."""

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        """The fields of the local rows `rows` (indices into `view.rows`)."""
        raise NotImplementedError

    def remember(self, view: RolloutView, rows: Sequence[int], context: Context) -> None:
        """Keep what `context` (of the local rows `rows` of `view`) showed the teacher, for measuring later whether
        the student cites it (a generated source records its generated fields: `GeneratedSource.remember`); nothing
        here."""

    def max_prompt_tokens(self) -> int | None:
        """The longest teacher prompt, in tokens, this source allows (None: no bound): a longer one is refused naming
        the row, never truncated."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """What the source carries from one rollout to the next (RESD's playbook), JSON-serializable: saved in every
        checkpoint (`rlsd_source_state.json`) and handed back to `load_state_dict` on resume. None: stateless."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a resumed run continues with the saved state)."""


SOURCES: dict[str, type[PrivilegedSource]] = {}
"""Every registered source by name: what `RLSDConfig.privileged_source` selects from."""
SOURCE_KNOBS: dict[str, Knob] = {}
"""Every registered source's knob by its `RLSDConfig` field name."""


def privileged_source(cls: type[PrivilegedSource]) -> type[PrivilegedSource]:
    """Register a source class under its `name`, with its `knobs` (a name may be shared only with the same
    declaration, and never with a credit rule's or a distillation loss's knob)."""
    if cls.name in SOURCES:
        raise ValueError(f"privileged source {cls.name!r} is registered twice")
    declare_knobs(f"privileged source {cls.name!r}", cls.knobs, SOURCE_KNOBS, KNOBS, LOSS_KNOBS)
    SOURCES[cls.name] = cls
    return cls


@privileged_source
class AnswerSource(PrivilegedSource):
    """The reference answer of each row, from `args.privileged_column` (the paper's teacher, section 2.3)."""

    name = "answer"
    fills = ("answer",)
    default_template = PAPER_TEACHER_TEMPLATE

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        check_privileged_column(dataset, self.args.privileged_column, split_name)

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        return Context({"answer": reference_answers(view, rows, self.args.privileged_column)}, [True] * len(rows))


def reference_answers(view: RolloutView, rows: Sequence[int], column: str) -> list[Any]:
    """The privileged `column` of the local rows `rows`; a row without it is refused, naming it and its columns."""
    for i in rows:
        if column not in view.rows[i]:
            raise KeyError(f"rollout row {i} has no privileged column {column!r}; it has {sorted(view.rows[i])}")
    return [view.rows[i][column] for i in rows]


@privileged_source
class SiblingSource(PrivilegedSource):
    """SDPO's context: the first other completion of the row's group whose total reward reaches
    `sibling_reward_threshold` (groups may span processes); a row without one has no context."""

    name = "sibling"
    fills = ("sibling",)
    default_template = SIBLING_TEACHER_TEMPLATE
    needs_completions = True

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        texts, found = self.siblings(view)
        return Context({"sibling": [texts[i] for i in rows]}, [found[i] for i in rows], self._metrics(found, found))

    def siblings(self, view: RolloutView) -> tuple[list[str], list[bool]]:
        """Every local row's sibling text (`NO_SIBLING_TEXT` when none succeeded) and whether it has one."""
        picks = pick_siblings(list(view.rewards), view.group_size, self.args.sibling_reward_threshold)
        local = picks[view.offset : view.offset + len(view.rows)]
        return [NO_SIBLING_TEXT if j is None else view.completion_texts[j] for j in local], [
            j is not None for j in local
        ]

    @staticmethod
    def _metrics(found: list[bool], has_context: list[bool]) -> dict[str, float]:
        """`no_sibling_count` (summed over processes) and `no_context_frac` (the row mean over processes)."""
        rows = max(len(has_context), 1)
        return {
            "no_sibling_count": float(sum(not f for f in found)),
            "no_context_frac": TokenMean(sum(not h for h in has_context) / rows, len(has_context)),
        }


@privileged_source
class AnswerAndSiblingSource(SiblingSource):
    """The reference answer and, when one succeeded, a sibling (`NO_SIBLING_TEXT` otherwise): every row has
    context."""

    name = "both"
    fills = ("answer", "sibling")
    default_template = BOTH_TEACHER_TEMPLATE

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        check_privileged_column(dataset, self.args.privileged_column, split_name)

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        answers = AnswerSource(self.args).context(view, rows)
        texts, found = self.siblings(view)
        everyone = [True] * len(view.rows)
        fields = {**answers.fields, "sibling": [texts[i] for i in rows]}
        return Context(fields, [True] * len(rows), self._metrics(found, everyone))


@privileged_source
class NoContextSource(PrivilegedSource):
    """No privileged context: the teacher prompt is the student's prompt (template `"{prompt}"`), every row counts as
    having context. For an external teacher (`teacher_model`, OPD); a self-teacher shown nothing differs from the
    student only by its weights (a live one gives Delta = 0)."""

    name = "none"
    fills = ()
    default_template = "{prompt}"

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        return Context({}, [True] * len(rows))


def get_source(name: str) -> type[PrivilegedSource]:
    """The registered source `name`; an unknown name is refused with the known ones listed."""
    if name not in SOURCES:
        raise ValueError(f"privileged_source={name!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[name]


def known_template_fields() -> tuple[str, ...]:
    """`{prompt}` and every field a registered source fills: what a teacher template may name."""
    fills = dict.fromkeys(name for cls in SOURCES.values() for name in cls.fills)
    return ("prompt", *fills)


def validate_teacher_template(template: str, source: str = "answer") -> None:
    """Reject a template with an unknown field, a field the source does not fill, or without `{prompt}` and every
    field the source fills; a source that `replaces_prompt` may omit `{prompt}` (its template names its own field,
    which stands in for the student's prompt)."""
    cls = get_source(source)
    if cls.replaces_prompt:
        check_template_fields(template, source, cls.fills, known_template_fields(), optional=("prompt",))
    else:
        check_template_fields(template, source, ("prompt", *cls.fills), known_template_fields())


def check_privileged_column(dataset: Any, column: str, split_name: str) -> None:
    """Fail at construction when the privileged column is missing or holds empty answers."""
    if dataset is None:
        return
    for part in _splits(dataset):
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


def _splits(dataset: Any) -> list[Any]:
    """The splits of a dataset dict, or the dataset itself."""
    return list(dataset.values()) if isinstance(dataset, dict | IterableDatasetDict) else [dataset]
