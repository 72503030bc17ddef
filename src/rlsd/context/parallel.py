"""`ParallelSource` ("parallel"): the teacher is shown a parallel version of the student's query *instead of* it.

MSD (Multilingual Self-Distillation, arXiv 2605.02971) distils a model's behaviour on a query in a high-resource
language (English) into its behaviour on the same query in a low-resource one: the student answers the query as the
dataset has it, the teacher (the same model) the parallel query, and nothing else is shown to either. The parallel
prompt of a row comes from the dataset column `parallel_column` when the row has a non-empty string there, else a
generator writes it (`context_generator`: the policy or the teacher asked to translate the prompt into
`parallel_language` under `parallel_instruction`, or a deterministic function such as the embedded task's
`"task-words"`). It is generated once per distinct prompt of a rollout batch, so the G completions of a group share
one teacher prompt.

The source `replaces_prompt`: its default template is `"{parallel}"`, and a template may omit `{prompt}`. For a
conversational prompt the last user turn is replaced (system turns are kept); the teacher never sees the student's
text unless the template names `{prompt}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from datasets import Dataset

from rlsd.context.generated import GENERATED_KNOBS, GeneratedSource, instruction_check
from rlsd.context.sources import Context, RolloutView, _splits, privileged_source
from rlsd.context.templates import is_empty_answer
from rlsd.core.rules import Knob

PARALLEL_INSTRUCTION = (
    "Translate the following request into {language}. Keep its meaning and any instruction on how to format the "
    "answer. Write only the translation.\n\n{prompt}"
)
"""What a model generator is asked for each row's parallel prompt: `{language}` is `parallel_language`, `{prompt}`
the student's prompt (its last user turn)."""


def _column_name(value: Any) -> str | None:
    """A knob check: a column name, or "" for none."""
    return None if isinstance(value, str) else f"must be a column name (or '' for none), got {value!r}"


def _language(value: Any) -> str | None:
    """A knob check: a non-empty string."""
    return None if isinstance(value, str) and value.strip() else f"must name a language, got {value!r}"


_instruction = instruction_check(("prompt", "language"), required="prompt")


PARALLEL_KNOBS = {
    **GENERATED_KNOBS,
    "parallel_column": Knob(
        "parallel_prompt",
        "With privileged_source='parallel', the dataset column holding each row's parallel prompt (the same query in "
        "another language or form); a row without a non-empty string there gets a generated one ('': always "
        "generate).",
        _column_name,
    ),
    "parallel_language": Knob(
        "English", "With privileged_source='parallel', the language a model generator translates the prompt into.",
        _language,
    ),
    "parallel_instruction": Knob(
        PARALLEL_INSTRUCTION,
        "With privileged_source='parallel', what a model generator is asked: {prompt} is the student's prompt (its "
        "last user turn), {language} is parallel_language.",
        _instruction,
    ),
}  # fmt: skip


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a plain-text prompt itself; a conversation's last user turn (its last text block when
    the turn holds blocks)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            texts = [block["text"] for block in content if block.get("type") == "text"]
            return texts[-1] if texts else ""
    raise ValueError("a conversational prompt has no user turn to write a parallel version of")


@privileged_source
class ParallelSource(GeneratedSource):
    """A parallel version of each row's prompt, shown to the teacher in place of the student's prompt (see the
    module docstring). Every row has context. Logs `rlsd/parallel_from_column` and `rlsd/parallel_generated` (rows of
    this batch, summed over processes) besides the generator's calls and time."""

    name = "parallel"
    fills = ("parallel",)
    default_template = "{parallel}"
    replaces_prompt = True
    needs_completions = False  # the parallel prompt depends on the prompt alone
    generated_fields: ClassVar[dict[str, str]] = {"parallel": ""}  # one from the column too: the teacher read it
    knobs = PARALLEL_KNOBS

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        """A `parallel_column` that is present holds strings (or nothing): anything else is refused naming rows."""
        column = self.args.parallel_column
        if dataset is None or not column:
            return
        for part in _splits(dataset):
            if not isinstance(part, Dataset) or column not in part.column_names:
                continue
            bad = [i for i, value in enumerate(part[column]) if not (isinstance(value, str) or is_empty_answer(value))]
            if bad:
                shown = ", ".join(str(i) for i in bad[:10])
                raise ValueError(
                    f"{split_name} column {column!r} (parallel_column) holds a non-string in {len(bad)} row(s): "
                    f"{shown}" + (" ..." if len(bad) > 10 else "")
                )

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        column = self.args.parallel_column
        texts: dict[int, str] = {}
        missing: list[int] = []
        for i in rows:
            value = view.rows[i].get(column) if column else None
            if isinstance(value, str) and value.strip():
                texts[i] = value
            elif is_empty_answer(value):
                missing.append(i)
            else:
                raise TypeError(f"privileged source 'parallel': column {column!r} of rollout row {i} holds a "
                                f"{type(value).__name__}, not a string")  # fmt: skip
        # one generation per distinct prompt (the G completions of a group share it); a model generator is called on
        # every process for every batch, also with nothing to write (it may generate collectively)
        first: dict[str, int] = {}
        for i in missing:
            first.setdefault(repr(view.rows[i]["prompt"]), i)
        unique = list(first.values())
        written, metrics = self.generate(view, unique, self.requests(view, unique, lambda i: self.request(view, i)))
        by_prompt = dict(zip(first, written, strict=True))
        for i in missing:
            texts[i] = by_prompt[repr(view.rows[i]["prompt"])]
        metrics = {**metrics, "parallel_from_column": float(len(rows) - len(missing)),
                   "parallel_generated": float(len(missing))}  # fmt: skip
        return Context({"parallel": [texts[i] for i in rows]}, [True] * len(rows), metrics)

    def request(self, view: RolloutView, row: int) -> Any:
        """What a model generator completes for `row`: `parallel_instruction` around the prompt's text, as a user
        turn when the dataset's prompts are conversations."""
        prompt = view.rows[row]["prompt"]
        text = self.args.parallel_instruction.format(prompt=prompt_text(prompt), language=self.args.parallel_language)
        return text if isinstance(prompt, str) else [{"role": "user", "content": text}]
