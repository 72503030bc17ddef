"""VISD's judge on the embedded video task (`privileged_source="judge"`, the `"video-judge"` generator): the
structured feedback a video-aware judge model writes in the paper, written here from the task's checker instead.

A clip shows one character of the expression per frame (`3+4*5`: frame 1 shows 3, frame 2 +, ...), named by the
row's `frame_text` column. The judge compares the completion with the task's own steps (`Problem.steps`) and
writes one part per dimension (`rlsd.context.judge`):

- answer: "ok", "wrong" or "missing" (no single integer `<answer>`);
- logic: "ok", "no steps" (no think block), "step k missing, should be 3+20=23" (the steps stop early) or "step k
  should be 3+20=23" (the first step that departs from the task's steps: an arithmetic slip, a wrong order, or a
  misread operand carried through);
- grounding: "ok", or "frame f shows 5, read as 6" when that first departing step uses, where the task's step takes
  an operand from frame f, a number that is neither in any frame nor the result of an earlier step (a misreading;
  an operand taken from another frame is a wrong order, a logic error).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from rlsd.context.generated import GenerationRequest, context_generator
from rlsd.experiments.contexts import _Unworked, _written_steps, task_problem
from rlsd.experiments.task import Problem, parse_answer

FRAME_COLUMN = "frame_text"
"""The video task's column naming what each frame shows, one character per frame (`3+4*5`)."""
_WRITTEN = re.compile(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)")
_PLANNED = re.compile(r"([@#]\d+)[-+*]([@#]\d+)")


def clip_problem(row: dict) -> tuple[Problem, str]:
    """The problem a row's clip shows and its frame text; a row without `frame_text` is refused naming the column."""
    text = row.get(FRAME_COLUMN)
    if not isinstance(text, str) or not text:
        raise ValueError(f"the video judge reads the clip's frames from column {FRAME_COLUMN!r}, which the row lacks "
                         f"(it has {sorted(row)})")  # fmt: skip
    return task_problem({"prompt": f"Q: {text}=", "solution": row.get("solution")}), text


def operand_frames(frame_text: str) -> list[tuple[int, int]]:
    """The frames (first, last; 1-based) that show each operand, in order: `3+4*5` -> [(1, 1), (3, 3), (5, 5)]."""
    return [(match.start() + 1, match.end()) for match in re.finditer(r"\d+", frame_text)]


def step_sources(problem: Problem) -> list[tuple[str, str]]:
    """Where each of the task's steps takes its two operands from: `@j` operand j (0-based), `#k` the result of step
    k: `3+4*5` -> [("@1", "@2"), ("@0", "#1")]."""
    steps = itertools.count(1)
    labelled = tuple(_Unworked(f"@{j}", steps) for j in range(len(problem.operands)))
    planned = dataclasses.replace(problem, operands=labelled).steps
    return [_PLANNED.fullmatch(step.rsplit("=", 1)[0]).groups() for step in planned]


def misread(problem: Problem, frame_text: str, index: int, written: str) -> str | None:
    """The grounding part for the task's step `index` (0-based) written as `written`: the first operand taken from a
    frame that the step writes as a number in no frame and no earlier result, else None."""
    match = _WRITTEN.fullmatch(written)
    if match is None:
        return None
    results = {int(step.rsplit("=", 1)[1]) for step in problem.steps[:index]}
    known = set(problem.operands) | results
    frames = operand_frames(frame_text)
    for source, value in zip(step_sources(problem)[index], (match.group(1), match.group(3)), strict=True):
        if source.startswith("@") and int(value) not in known:
            operand = int(source[1:])
            first, last = frames[operand]
            where = f"frame {first}" if first == last else f"frames {first}-{last}"
            verb = "shows" if first == last else "show"
            return f"{where} {verb} {problem.operands[operand]}, read as {value}"
    return None


def judge_clip(problem: Problem, frame_text: str, completion: str) -> str:
    """The judge's feedback on one completion: `answer: ...; logic: ...; grounding: ...` (see the module
    docstring)."""
    given = parse_answer(completion)
    answer = "ok" if given == problem.answer else "missing" if given is None else "wrong"
    logic, grounding = "ok", "ok"
    written = [step for _, step in _written_steps(completion)]
    if "<think>" not in completion or "</think>" not in completion:
        logic = "no steps"
    else:
        for index, expected in enumerate(problem.steps):
            if index >= len(written):
                logic = f"step {index + 1} missing, should be {expected}"
                break
            if written[index] != expected:
                logic = f"step {index + 1} should be {expected}"
                grounding = misread(problem, frame_text, index, written[index]) or "ok"
                break
    return f"answer: {answer}; logic: {logic}; grounding: {grounding}"


@context_generator("video-judge")
def video_judge(request: GenerationRequest) -> str:
    """VISD's judge on the video task, from the task's checker (`judge_clip` on the row's clip and completion)."""
    problem, frame_text = clip_problem(request.row)
    return judge_clip(problem, frame_text, request.completion or "")
