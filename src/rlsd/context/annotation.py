"""`AnnotationSource` ("annotation"): TRACE's privileged context and token routing (Token-Routed Alignment for
Critical rEasoning, arXiv 2605.10194): an annotator marks the key spans of each correct completion and the error spans
of each wrong one; the distillation loss (`distill_loss="trace"`) reads them per token.

Each row's completion goes to the generator (`context_generator`: the policy, as the paper's online self-annotation,
the teacher, or a function such as the embedded task's `"task-annotator"`) under `annotation_instruction`, told
whether the completion is correct (its weighted total reward above `annotation_reward_threshold`) or wrong. The
annotation is plain text (the format a model can write):

    first non-empty line     the coarse diagnostic type ("key steps", "arithmetic error", ...)
    every further line       one marked span, copied exactly from the completion (one line of it at most)

Each span is located in the completion text, searching forward from the end of the previous span (then from the
start), and becomes a character span labelled +1 (key: a correct row) or -1 (error: a wrong row); a span that is not
found is dropped and counted (`rlsd/annotation_unfound_count`), never silently. The trainer maps the character spans
to the completion's tokens (`token_char_offsets`, `span_token_labels`: a token is in a span when its characters
overlap it) into the (B, T) labels the loss routes by.

The teacher is shown the reference answer (`privileged_column`) and the diagnostic type only, never the span text (the
paper: "giving the teacher only a coarse diagnostic type, not the span text"; that the reference answer is shown too is
this project's reading of its self-OPD teacher). A row whose annotation is empty has no context (counted in
`rlsd/context_fallback_count`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from rlsd.context.generated import (
    GENERATED_KNOBS,
    GeneratedSource,
    chat_turn,
    finite_number,
    instruction_check,
    no_context_frac,
)
from rlsd.context.reflection import prompt_text
from rlsd.context.sources import Context, RolloutView, check_privileged_column, privileged_source, reference_answers
from rlsd.core.rules import Knob

KEY, ERROR = 1, -1
"""The token labels: a key span of a correct completion, an error span of a wrong one (0: neither)."""

ANNOTATION_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "An annotator's diagnosis of an attempt at this problem: {diagnosis}.\n\n"
    "After understanding the reference solution, please try to solve this problem using your own approach below."
)
"""The teacher prompt of `privileged_source="annotation"`: the reference answer and the diagnostic type (not the
spans)."""

ANNOTATION_INSTRUCTION = (
    "Below is a problem and an attempt at it, which is {verdict}. The reference answer is {answer}.\n"
    "On the first line, write a short diagnostic type ({kinds}). Then, one per line, copy exactly the {what} of the "
    "attempt, each a short piece of one line of it; write nothing else.\n\n"
    "Problem:\n{prompt}\n\n"
    "Attempt:\n{completion}"
)
"""What a model generator is asked for each row: `{verdict}` "correct" or "wrong", `{what}` the spans to copy (the
key steps of a correct attempt; where a wrong one first goes wrong and what follows), `{kinds}` examples of types,
`{answer}` the reference answer, `{prompt}` the student's prompt (its last user turn), `{completion}` the attempt."""
INSTRUCTION_FIELDS = ("verdict", "what", "kinds", "answer", "prompt", "completion")
_ASKED = {
    KEY: ("correct", "key steps (the decisive results and choices)", 'e.g. "key steps"'),
    ERROR: ("wrong", "erroneous steps (the first wrong step and what follows from it)",
            'e.g. "arithmetic error", "wrong order of operations", "missing answer"'),
}  # fmt: skip


_instruction = instruction_check(INSTRUCTION_FIELDS)
_finite = finite_number


ANNOTATION_KNOBS = {
    **GENERATED_KNOBS,
    "annotation_reward_threshold": Knob(
        0.0, "With privileged_source='annotation', a completion whose total (weighted) reward is above this is "
        "correct (its spans are key spans, label +1); one at or below it is wrong (error spans, label -1).", _finite,
    ),
    "annotation_instruction": Knob(
        ANNOTATION_INSTRUCTION, "With privileged_source='annotation', what a model generator is asked for each row: "
        "{completion} the attempt, {verdict} 'correct' or 'wrong', {what} the spans to copy, {kinds} example types, "
        "{answer} the reference answer, {prompt} the student's prompt. The answer's first line is the diagnostic "
        "type, each further line one span copied from the attempt.", _instruction,
    ),
}  # fmt: skip


def parse_annotation(text: str) -> tuple[str, list[str]]:
    """The diagnostic type (the first non-empty line, stripped) and the marked spans (every further non-empty line,
    as written: a span is located verbatim) of an annotation."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "", []
    return lines[0].strip(), lines[1:]


def locate_spans(completion: str, spans: Sequence[str]) -> tuple[list[tuple[int, int]], int]:
    """The character spans [start, end) of `spans` in `completion`, each searched forward from the end of the
    previous one found (so that a repeated piece maps in order), then from the start; and how many were not found
    (dropped)."""
    found, missing, cursor = [], 0, 0
    for span in spans:
        start = completion.find(span, cursor)
        if start < 0:
            start = completion.find(span)
        if start < 0 or not span:
            missing += 1
            continue
        found.append((start, start + len(span)))
        cursor = start + len(span)
    return found, missing


def token_char_offsets(pieces: Sequence[str], prefixes: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Each token's character span [start, end) in the decoded completion: the lengths of the tokens decoded alone
    (`pieces`) added up, or, when given (the pieces do not add up to the whole: a character split over tokens), each
    token ending where the decoding of the growing prefix `prefixes[k]` (the first k + 1 tokens) ends. A token that
    decodes to nothing (a special token, a partial character) has an empty span."""
    if prefixes is not None:
        ends = [len(prefix) for prefix in prefixes]
    else:
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
    offsets, start = [], 0
    for end in ends:
        offsets.append((start, max(start, end)))
        start = max(start, end)
    return offsets


def span_token_labels(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, int]]) -> list[int]:
    """Each token's label: that of the first (start, end, label) character span its characters overlap
    (token [a, b) and span [s, e) overlap when a < e and s < b), 0 when none; an empty token is never in a span."""
    labels = []
    for a, b in offsets:
        label = 0
        if b > a:
            for s, e, value in spans:
                if a < e and s < b:
                    label = value
                    break
        labels.append(label)
    return labels


def completion_token_labels(tokenizer: Any, ids: Sequence[int], spans: Sequence[tuple[int, int, int]]) -> list[int]:
    """The labels of the completion tokens `ids` (those the source read, decoded as it decoded them: special tokens
    skipped) from character spans of their decoding."""
    ids = list(ids)
    pieces = [tokenizer.decode([token], skip_special_tokens=True) for token in ids]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    prefixes = None
    if "".join(pieces) != whole:
        prefixes = [tokenizer.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
    return span_token_labels(token_char_offsets(pieces, prefixes), spans)


@privileged_source
class AnnotationSource(GeneratedSource):
    """TRACE's annotator: key spans of correct completions, error spans of wrong ones, and the teacher shown the
    reference answer and the diagnostic type (see the module docstring)."""

    name = "annotation"
    fills = ("answer", "diagnosis")
    default_template = ANNOTATION_TEACHER_TEMPLATE
    knobs = ANNOTATION_KNOBS
    falls_back = True  # an empty annotation leaves the row without context (counted), not the run stopped
    generated_fields: ClassVar[dict[str, str]] = {"diagnosis": "none"}  # the teacher sees the type, not the spans

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        check_privileged_column(dataset, self.args.privileged_column, split_name)

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        answers = reference_answers(view, rows, self.args.privileged_column)
        labels = {i: self.label(view, i) for i in rows}
        requests = self.requests(view, rows, lambda i: self.request_prompt(view, i, labels[i]))
        texts, metrics = self.generate(view, rows, requests)
        diagnoses, char_spans, unfound, marked = [], [], 0, 0
        for i, text in zip(rows, texts, strict=True):
            kind, pieces = parse_annotation(text or "")
            found, missing = locate_spans(view.completion_texts[view.offset + i], pieces)
            unfound, marked = unfound + missing, marked + len(found)
            diagnoses.append(kind or "none")
            char_spans.append([(start, end, labels[i]) for start, end in found])
        has_context = [text is not None for text in texts]
        metrics.update(
            annotation_span_count=float(marked),
            annotation_unfound_count=float(unfound),
            no_context_frac=no_context_frac(has_context),
        )
        fields = {"answer": answers, "diagnosis": diagnoses}
        return Context(fields, has_context, metrics, char_spans=char_spans)

    def label(self, view: RolloutView, row: int) -> int:
        """KEY for a correct local row (reward above the threshold), ERROR for a wrong one."""
        return KEY if view.rewards[view.offset + row] > self.args.annotation_reward_threshold else ERROR

    def request_prompt(self, view: RolloutView, row: int, label: int) -> Any:
        """What a model generator is asked about local row `row`: `annotation_instruction` filled in, as a chat turn
        when the dataset's prompts are conversations."""
        prompt = view.rows[row]["prompt"]
        verdict, what, kinds = _ASKED[label]
        text = self.args.annotation_instruction.format(
            verdict=verdict, what=what, kinds=kinds, answer=view.rows[row][self.args.privileged_column],
            prompt=prompt_text(prompt), completion=view.completion_texts[view.offset + row],
        )  # fmt: skip
        return chat_turn(prompt, text)
