"""Teacher prompts: the student's prompt rewritten to show privileged context: the reference answer (section 2.3),
a successful sibling completion of the same group (SDPO, section 3.3), or both."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

PAPER_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "After understanding the reference solution, please try to solve this problem using your own approach below."
)
"""The authors' teacher prompt. `{prompt}` is the student's last user turn (which carries the answer-format
instruction), `{answer}` the reference final answer."""

SIBLING_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a correct solution from another attempt:\n"
    "{sibling}\n\n"
    "After understanding the correct solution, please try to solve this problem using your own approach below."
)
"""Teacher prompt of `privileged_source="sibling"` (SDPO's teacher): a successful completion of the same group."""

BOTH_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "Here is a correct solution from another attempt:\n"
    "{sibling}\n\n"
    "After understanding them, please try to solve this problem using your own approach below."
)
"""Teacher prompt of `privileged_source="both"`."""

NO_SIBLING_TEXT = "(no other attempt was correct)"
"""What `{sibling}` shows with `privileged_source="both"` when no sibling succeeded (the answer still teaches)."""

TEMPLATE_FIELDS = ("prompt", "answer", "sibling")
"""The fields of the built-in sources; `rlsd.context.sources.known_template_fields` adds those of every registered
one."""

Prompt = str | list[dict[str, Any]]


def template_fields(template: str) -> set[str]:
    """The named fields of a format string; a positional field or a malformed string is refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"teacher_template is not a valid format string: {err}") from err
    return {name for _, name, _, _ in parsed if name is not None}


def check_template_fields(
    template: str,
    source: str,
    filled: tuple[str, ...],
    known: tuple[str, ...] = TEMPLATE_FIELDS,
    optional: tuple[str, ...] = (),
) -> None:
    """Reject a template with a field no source knows (`known`), a field the privileged `source` does not fill, or
    without every field in `filled`. `optional`: fields the source allows but does not require (`{prompt}` for a
    source whose context replaces the student's prompt)."""
    fields = template_fields(template)
    unknown = sorted(fields - set(known))
    if unknown:
        raise ValueError(
            f"teacher_template has unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
            f"the known fields are {', '.join('{' + f + '}' for f in known)}"
        )
    allowed = (*optional, *filled)
    unfilled = sorted(fields - set(allowed))
    if unfilled:
        raise ValueError(
            f"teacher_template uses {{{unfilled[0]}}}, which privileged_source={source!r} does not fill "
            f"(it fills {', '.join('{' + f + '}' for f in allowed)})"
        )
    missing = [f for f in filled if f not in fields]
    if missing:
        raise ValueError(f"teacher_template must contain {{{missing[0]}}}; got {template!r}")


def render_teacher_prompt(prompt: Prompt, template: str, **fields: Any) -> Prompt:
    """The teacher's view of one row: a plain-text prompt is filled in whole; for a conversation the last user turn
    is rewritten (its last text block when it holds image blocks, which stay) and every other turn (system prompts
    included) is kept. `fields` fill `{answer}` / `{sibling}`."""
    values = {name: _answer_text(value) for name, value in fields.items()}
    if isinstance(prompt, str):
        return template.format(prompt=prompt, **values)
    last_user = _last_user_index(prompt)
    content = prompt[last_user]["content"]
    if isinstance(content, str):
        rewritten = template.format(prompt=content, **values)
    else:
        rewritten = _rewrite_blocks(content, template, values)
    return [*prompt[:last_user], {**prompt[last_user], "content": rewritten}, *prompt[last_user + 1 :]]


def _rewrite_blocks(blocks: list[dict[str, Any]], template: str, values: dict[str, str]) -> list[dict[str, Any]]:
    """Structured content (image and text blocks): the last text block is filled into the template and every other
    block (images included, in place) is kept, so that the teacher sees what the student sees plus the context; a turn
    without text gets one text block after its images."""
    text_indices = [i for i, block in enumerate(blocks) if block.get("type") == "text"]
    if not text_indices:
        return [*blocks, {"type": "text", "text": template.format(prompt="", **values).lstrip()}]
    last = text_indices[-1]
    rewritten = {**blocks[last], "text": template.format(prompt=blocks[last]["text"], **values)}
    return [*blocks[:last], rewritten, *blocks[last + 1 :]]


def has_image_blocks(prompt: Any) -> bool:
    """True when a conversational prompt holds an image block in any turn (images carried inside the prompt)."""
    if not isinstance(prompt, list):
        return False
    return any(
        isinstance(message, dict)
        and isinstance(message.get("content"), list)
        and any(isinstance(block, dict) and block.get("type") == "image" for block in message["content"])
        for message in prompt
    )


def render_teacher_prompts(
    prompts: Sequence[Prompt], template: str, columns: Mapping[str, Sequence[Any]]
) -> list[Prompt]:
    """`render_teacher_prompt` over a batch, `columns[field][row]` filling each template field; an empty answer
    fails naming its position and prompt."""
    used = template_fields(template) - {"prompt"}
    missing = sorted(used - set(columns))
    if missing:
        raise ValueError(f"teacher_template uses {{{missing[0]}}} but no values for it were given")
    fields = {name: columns[name] for name in used}
    for name, values in fields.items():
        if len(values) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(values)} {name}s")
    for index, answer in enumerate(fields.get("answer") or []):
        if is_empty_answer(answer):
            raise ValueError(f"empty privileged answer in batch row {index} (prompt: {_preview(prompts[index])})")
    return [
        render_teacher_prompt(prompt, template, **{name: values[row] for name, values in fields.items()})
        for row, prompt in enumerate(prompts)
    ]


def pick_siblings(rewards: Sequence[float], group_size: int, threshold: float) -> list[int | None]:
    """SDPO's privileged context: for each completion, the first other completion of its group (consecutive
    blocks of `group_size`) whose reward reaches `threshold`; None when no sibling succeeded."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    picks: list[int | None] = []
    for index in range(len(rewards)):
        first = index - index % group_size
        winners = [j for j in range(first, first + group_size) if j != index and rewards[j] >= threshold]
        picks.append(winners[0] if winners else None)
    return picks


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
