"""`JudgeSource` ("judge"): VISD's privileged context (Video Reasoning via Structured Self-Distillation, arXiv
2605.06094): a judge's structured feedback on each rollout, shown to the teacher beside the reference answer; the
credit is RLSD's direction-magnitude rule (`credit="rlsd"`: the verifier's A_i sets the sign, the teacher's Delta_t
only the token's magnitude).

Each row's completion goes to the judge (`context_generator`: a function such as the video task's scripted
`"video-judge"`, or a model, "policy" or "teacher", under `judge_instruction`), told the verifier's verdict (its
weighted total reward above `judge_reward_threshold`: correct) and the reference answer. The feedback is plain text
with one part per dimension of the paper's judge, `dimension: verdict`, the parts on separate lines or `;`-separated:

    answer: ok | wrong | missing
    logic: ok | the first step that does not follow and what it should be
    grounding: ok | the first frame (or detail of the input) the attempt misreads and what it shows

The teacher is shown the reference answer (`privileged_column`) and the feedback as written. A row whose feedback is
empty has no context (counted in `rlsd/context_fallback_count`; its Delta is 0). A model judge is handed text: the
question, the attempt and the reference, not the frames (the generator path renders text prompts); a judge that
must see the video is a function (`"module:function"`), which gets the dataset row, its `images` included.

Reconstructed, not the paper's code: only its abstract and project page could be read. They give the judge's three
dimensions (answer correctness, logical consistency, spatio-temporal grounding), the feedback as the teacher's
privileged information, and the direction-magnitude decoupling; the judge's prompt and output format, the teacher
template, and the paper's curriculum scheduling and EMA teacher are this project's choices (an EMA teacher is
`teacher="ema"`; no curriculum is built).
"""

from __future__ import annotations

import re
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
from rlsd.core.credit import TokenMean
from rlsd.core.rules import Knob

DIMENSIONS = ("answer", "logic", "grounding")
"""The judge's dimensions (the paper's answer correctness, logical consistency and spatio-temporal grounding)."""

JUDGE_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference answer:\n{answer}\n\n"
    "A judge's structured feedback on an attempt at this problem (answer, logic, grounding in the input):\n"
    "{feedback}\n\n"
    "Using it, solve the problem correctly with your own approach below."
)
"""The teacher prompt of `privileged_source="judge"`: the reference answer and the judge's feedback."""

JUDGE_INSTRUCTION = (
    "You are a judge. Below is a problem about a video, its reference answer and an attempt at it, which the verifier "
    "found {verdict}. Assess the attempt and write exactly three lines:\n"
    "answer: ok, wrong or missing\n"
    "logic: ok, or the first reasoning step that does not follow and what it should be\n"
    "grounding: ok, or the first frame or detail of the video the attempt misreads and what it shows\n\n"
    "Problem:\n{prompt}\n\n"
    "Reference answer: {answer}\n\n"
    "Attempt:\n{completion}"
)
"""What a model judge is asked for each row: `{verdict}` "correct" or "wrong", `{answer}` the reference answer,
`{prompt}` the student's prompt (its last user turn's text), `{completion}` the attempt."""
INSTRUCTION_FIELDS = ("verdict", "answer", "prompt", "completion")
_PART = re.compile(r"^\s*(answer|logic|grounding)\s*:\s*(.*?)\s*$", re.IGNORECASE)

JUDGE_KNOBS = {
    **GENERATED_KNOBS,
    "judge_reward_threshold": Knob(
        0.0, "With privileged_source='judge', a completion whose total (weighted) reward is above this is correct "
        "(the verdict the judge is told); one at or below it is wrong.", finite_number,
    ),
    "judge_instruction": Knob(
        JUDGE_INSTRUCTION, "With privileged_source='judge', what a model judge is asked for each row: {completion} "
        "the attempt, {verdict} 'correct' or 'wrong', {answer} the reference answer, {prompt} the student's prompt. "
        "Its answer is one 'dimension: verdict' line each for answer, logic and grounding.",
        instruction_check(INSTRUCTION_FIELDS),
    ),
}  # fmt: skip


def parse_feedback(text: str) -> dict[str, str]:
    """The verdict of each dimension the feedback names (`answer: wrong; logic: ok` or one part a line), the first
    when one is named twice; a part that names no dimension is left out."""
    verdicts: dict[str, str] = {}
    for part in re.split(r"[;\n]", text):
        match = _PART.match(part)
        if match:
            verdicts.setdefault(match.group(1).lower(), match.group(2))
    return verdicts


@privileged_source
class JudgeSource(GeneratedSource):
    """VISD's teacher context: the reference answer and a judge's structured feedback on the row's completion (see
    the module docstring)."""

    name = "judge"
    fills = ("answer", "feedback")
    default_template = JUDGE_TEACHER_TEMPLATE
    knobs = JUDGE_KNOBS
    falls_back = True  # an empty feedback leaves the row without context (counted), not the run stopped
    generated_fields: ClassVar[dict[str, str]] = {"feedback": ""}  # recorded for the held-out citation metric

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        check_privileged_column(dataset, self.args.privileged_column, split_name)

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        answers = reference_answers(view, rows, self.args.privileged_column)
        requests = self.requests(view, rows, lambda i: self.request_prompt(view, i))
        texts, metrics = self.generate(view, rows, requests)
        has_context = [text is not None for text in texts]
        judged = [parse_feedback(text) for text in texts if text is not None]
        for dimension in DIMENSIONS:  # the share of judged rows the dimension flags (named, and not "ok")
            flagged = sum(dimension in v and v[dimension].lower() != "ok" for v in judged)
            metrics[f"judge_{dimension}_flagged_frac"] = TokenMean(flagged / max(len(judged), 1), len(judged))
        metrics["no_context_frac"] = no_context_frac(has_context)
        fields = {"answer": answers, "feedback": [text or "" for text in texts]}
        return Context(fields, has_context, metrics)

    def request_prompt(self, view: RolloutView, row: int) -> Any:
        """What a model judge is asked about local row `row`: `judge_instruction` filled in, as a chat turn when the
        dataset's prompts are conversations."""
        prompt = view.rows[row]["prompt"]
        correct = view.rewards[view.offset + row] > self.args.judge_reward_threshold
        text = self.args.judge_instruction.format(
            verdict="correct" if correct else "wrong", answer=view.rows[row][self.args.privileged_column],
            prompt=prompt_text(prompt), completion=view.completion_texts[view.offset + row],
        )  # fmt: skip
        return chat_turn(prompt, text)
