"""Teacher prompts: the student's prompt rewritten to show the privileged answer (section 2.3)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

PAPER_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "After understanding the reference solution, please try to solve this problem using your own approach below."
)
"""The authors' teacher prompt. `{prompt}` is the student's last user turn (which carries the answer-format
instruction), `{answer}` the reference final answer."""

TEMPLATE_FIELDS = ("prompt", "answer")

Prompt = str | list[dict[str, Any]]


def validate_teacher_template(template: str) -> None:
    """Reject a template with an unknown or positional field, or without `{prompt}` and `{answer}`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"teacher_template is not a valid format string: {err}") from err
    fields = {name for _, name, _, _ in parsed if name is not None}
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(
            f"teacher_template has unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
            f"the known fields are {{prompt}} and {{answer}}"
        )
    missing = [f for f in TEMPLATE_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"teacher_template must contain {{{missing[0]}}}; got {template!r}")


def render_teacher_prompt(prompt: Prompt, answer: Any, template: str) -> Prompt:
    """The teacher's view of one row: a plain-text prompt is filled in whole; for a conversation the last user turn
    is rewritten and every other turn (system prompts included) is kept."""
    answer_text = _answer_text(answer)
    if isinstance(prompt, str):
        return template.format(prompt=prompt, answer=answer_text)
    last_user = _last_user_index(prompt)
    content = prompt[last_user]["content"]
    if not isinstance(content, str):
        raise ValueError("teacher prompts need text-only user turns; the last user turn has structured content")
    rewritten = {**prompt[last_user], "content": template.format(prompt=content, answer=answer_text)}
    return [*prompt[:last_user], rewritten, *prompt[last_user + 1 :]]


def render_teacher_prompts(prompts: Sequence[Prompt], answers: Sequence[Any], template: str) -> list[Prompt]:
    """`render_teacher_prompt` over a batch; an empty answer fails naming its position and prompt."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    for index, answer in enumerate(answers):
        if is_empty_answer(answer):
            raise ValueError(f"empty privileged answer in batch row {index} (prompt: {_preview(prompts[index])})")
    return [render_teacher_prompt(p, a, template) for p, a in zip(prompts, answers, strict=True)]


def is_empty_answer(answer: Any) -> bool:
    """True for None, NaN-like missing values and strings that are blank once stripped."""
    if answer is None:
        return True
    if isinstance(answer, float) and answer != answer:
        return True
    return isinstance(answer, str) and not answer.strip()


def _answer_text(answer: Any) -> str:
    """Answers may be numbers in some datasets; the teacher sees their text."""
    return answer if isinstance(answer, str) else str(answer)


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    """Index of the last user turn; a conversation without one cannot carry the privileged answer."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    raise ValueError("a conversational prompt has no user turn to carry the privileged answer")


def _preview(prompt: Prompt, limit: int = 80) -> str:
    """A short one-line rendering of a prompt for error messages."""
    text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
