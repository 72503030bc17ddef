"""The embedded task's context generators (`@context_generator`): deterministic stand-ins for the models that write
a generated context in the papers (a harness, a reflection, an annotator, a translator), built from the task's own
checker. Importing the method catalogue registers them."""

from __future__ import annotations

import dataclasses
import itertools
import re

from rlsd.context.generated import GenerationRequest, context_generator
from rlsd.context.parallel import prompt_text
from rlsd.experiments.task import HINT_PREFIX, OPERATORS, SEMANTICS, Problem, parse_answer

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
OPERATOR_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_EXPRESSION = re.compile(r"\d+(?:\s*[-+*]\s*\d+)+")


def number_words(value: int) -> str:
    """A non-negative integer below 10**15 in English words: 21 -> "twenty-one", 305 -> "three hundred five"."""
    if not 0 <= value < 10**15:
        raise ValueError(f"cannot write {value} in words (0 to 10**15 - 1)")
    if value < 20:
        return _ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    for scale, name in _SCALES:
        if value >= scale:
            high, rest = divmod(value, scale)
            return f"{number_words(high)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def expression_words(expression: str) -> str:
    """An arithmetic expression of non-negative integers and `+ - *` in words: "3+4*5-2" -> "three plus four times
    five minus two"."""
    tokens = re.findall(r"\d+|[-+*]", expression)
    return " ".join(OPERATOR_WORDS[token] if token in OPERATOR_WORDS else number_words(int(token)) for token in tokens)


@context_generator("task-words")
def task_words(request: GenerationRequest) -> str:
    """MSD's parallel prompt on the embedded task (`privileged_source="parallel"`): the row's problem with its
    expression written in words and everything around it kept, the task's frame included (`Q: 3+4*5-2=` -> `Q: three
    plus four times five minus two=`: the prompt's `Q: ` and the closing `=`, after which the task's answer format
    begins, stay as they are). The first expression of the prompt's text is rewritten; a prompt without one is
    refused (the source then stops naming the row)."""
    text = prompt_text(request.row["prompt"])
    match = _EXPRESSION.search(text)
    if match is None:
        raise ValueError(f"no arithmetic expression to write in words in {text!r}")
    return text[: match.start()] + expression_words(match.group()) + text[match.end() :]


# ------------------------------------------------------------------------------------ OPHSD's harness (task-harness)
_PROBLEM = re.compile(r"(\d+(?:[-+*]\d+)+)=")
_STEP = re.compile(r"(-?\d+)([-+*])(-?\d+)")


def task_problem(row: dict) -> Problem:
    """The embedded task's problem of a dataset row: the expression its prompt asks for (`Q: 3+4*5-2=`), read under
    the first of the task's semantics (products first, then left to right) whose answer is the row's `solution`, or
    products first when the row has none. A prompt without a problem, or a solution no semantics gives, is refused."""
    text = prompt_text(row["prompt"])
    match = _PROBLEM.search(text)
    if match is None:
        raise ValueError(f"no problem of the embedded task in the prompt {text!r}")
    tokens = re.findall(r"\d+|[-+*]", match.group(1))
    operands, operators = tuple(int(token) for token in tokens[::2]), tuple(tokens[1::2])
    problems = [Problem(operands, operators, semantics) for semantics in SEMANTICS]
    if row.get("solution") is None:
        return problems[0]
    for problem in problems:
        if str(problem.answer) == str(row["solution"]).strip():
            return problem
    raise ValueError(f"no semantics of the task gives the solution {row['solution']!r} of {text!r}")


class _Unworked:
    """A value of a problem's solution that its plan leaves unworked: an operand shows as itself, the result of the
    k-th step as `#k`. Combining two values is the next step, so that `Problem.steps` run on them lists the steps in
    the task's own order without working any of them out."""

    def __init__(self, text: str, steps: itertools.count) -> None:
        self.text, self.steps = text, steps

    def _next_step(self, other: _Unworked) -> _Unworked:
        return _Unworked(f"#{next(self.steps)}", self.steps)

    __add__ = __sub__ = __mul__ = _next_step

    def __str__(self) -> str:
        return self.text


def plan_steps(problem: Problem) -> list[str]:
    """The problem's steps in the order the task works them out, without their results: `3+4*5-2` (products first)
    -> `["4*5", "3+#1", "#2-2"]`, `#k` standing for the result of step k."""
    steps = itertools.count(1)
    unworked = dataclasses.replace(problem, operands=tuple(_Unworked(str(v), steps) for v in problem.operands))
    return [step.rsplit("=", 1)[0] for step in unworked.steps]


def verified_steps(problem: Problem) -> str:
    """The verification of the draft `;`-joined `problem.steps`: each step recomputed with the task's operators and
    marked `ok` (or `wrong`), then the answer: `4*5=20 ok;3+20=23 ok;23-2=21 ok;answer 21`."""
    checks = []
    for step in problem.steps:
        left, result = step.rsplit("=", 1)
        a, op, b = _STEP.fullmatch(left).groups()
        checks.append(f"{step} {'ok' if OPERATORS[op](int(a), int(b)) == int(result) else 'wrong'}")
    return ";".join([*checks, f"answer {problem.answer}"])


@context_generator("task-harness")
def task_harness(request: GenerationRequest) -> str:
    """OPHSD's harness on the embedded task (`privileged_source="harness"`), written from the task's checker instead
    of a model, each stage (`request.stage`) from the row's problem (`task_problem`):

    - "plan" (plan-then-solve): the ordered steps without their results, `4*5;3+#1;#2-2` for `Q: 3+4*5-2=`;
    - "draft" (draft-then-verify): the task's steps with their results, `4*5=20;3+20=23;23-2=21`;
    - "verify": those steps recomputed with the task's operators, `4*5=20 ok;3+20=23 ok;23-2=21 ok;answer 21`
      (the draft is the checker's own: the verification always passes).

    A stage of another harness is refused (the source then stops naming the row)."""
    problem = task_problem(request.row)
    if request.stage == "plan":
        return ";".join(plan_steps(problem))
    if request.stage == "draft":
        return ";".join(problem.steps)
    if request.stage == "verify":
        return verified_steps(problem)
    raise ValueError(f"the task-harness generator writes the stages plan, draft and verify, not {request.stage!r}")


# --------------------------------------------------------------------------------- RESD's reflection (task-reflection)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _step_lesson(expected: str, written: str) -> str:
    """The lesson of a wrong step: the order of the work when the step works on the wrong operands, else the step's
    correct arithmetic."""
    left = expected.rsplit("=", 1)[0]
    if written.rsplit("=", 1)[0] == left:
        return expected
    if "*" in left:
        return f"work out every product before any sum or difference: {expected} first"
    return f"after the products, work left to right: {expected} comes next"


@context_generator("task-reflection")
def task_reflection(request: GenerationRequest) -> str:
    """RESD's reflection on the embedded task (`privileged_source="reflection"`), written from the task's checker
    instead of a model: where the failed completion (`request.completion`) first departs from the task's own steps
    (`Problem.steps` of the row's problem, `task_problem`) and what was right there, or else what failed (no single
    integer answer, an answer that is not the last step's result), then the answer, ending with the `Lesson:` line the
    playbook curates: a wrong step's correct arithmetic (`3+20=23`), or the order of the work when the step took the
    wrong operands. A hint the completion cites (`ref=21;`) is not a step."""
    problem = task_problem(request.row)
    completion = request.completion or ""
    think = _THINK.search(completion)
    written = [step.strip() for step in think.group(1).split(";")] if think else []
    written = [step for step in written if step and not step.startswith(HINT_PREFIX)]
    answer = f"The answer is {problem.answer}."
    for index, expected in enumerate(problem.steps, start=1):
        if index > len(written):
            return (f"Step {index} is missing: it is {expected}. {answer} "
                    f"Lesson: write one step per operator: {';'.join(problem.steps)}")  # fmt: skip
        if written[index - 1] != expected:
            lesson = _step_lesson(expected, written[index - 1])
            return f"Step {index} wrote {written[index - 1]} where {expected} is right. {answer} Lesson: {lesson}"
    given = parse_answer(completion)
    if given is None:
        return (f"The steps are right but there is no single integer <answer>. {answer} Lesson: after </think>, "
                f"write the last step's result as <answer>{problem.answer}</answer>")  # fmt: skip
    if given != problem.answer:
        return f"The steps are right but the answer says {given}. {answer} Lesson: the answer is the last step's value"
    return f"The steps and the answer are right. {answer} Lesson: keep writing one checked step per operator"


# --------------------------------------------------------------------------------- TRACE's annotator (task-annotator)
def _written_steps(completion: str) -> list[tuple[int, str]]:
    """The steps written inside the completion's `<think>...</think>` as (character offset, step text), a hint the
    completion cites (`ref=21;`) left out; none without a think block."""
    think = _THINK.search(completion)
    if think is None:
        return []
    steps, offset = [], think.start(1)
    for piece in think.group(1).split(";"):
        stripped = piece.strip()
        if stripped and not stripped.startswith(HINT_PREFIX):
            steps.append((offset + piece.index(stripped), stripped))
        offset += len(piece) + 1
    return steps


@context_generator("task-annotator")
def task_annotator(request: GenerationRequest) -> str:
    """TRACE's annotator on the embedded task (`privileged_source="annotation"`), written from the task's checker
    instead of a model, in the source's format (the diagnostic type, then one span per line, copied from the
    completion):

    - a correct completion (its answer is the problem's, `task_problem`): "key steps", then each written step's
      computed result as written (`=20`, `=23`, `=21` for `4*5=20;3+20=23;23-2=21`);
    - a wrong one: the error span is where it first departs from the task's own steps and everything after it (each
      line of it); the type says how: "arithmetic error" (the right operands, a wrong result), "wrong order of
      operations" (the wrong operands), "missing step" (the steps stop early: from where the next step should be),
      "wrong answer" or "missing answer" (every step right: from the end of the steps), "no steps" (no think block:
      the whole completion)."""
    problem = task_problem(request.row)
    completion = request.completion or ""
    written = _written_steps(completion)
    if parse_answer(completion) == problem.answer:
        return "\n".join(["key steps", *(f"={step.rsplit('=', 1)[1]}" for _, step in written if "=" in step)])
    kind, start = None, None
    for (offset, step), expected in zip(written, problem.steps, strict=False):
        if step != expected:
            same_operands = step.rsplit("=", 1)[0] == expected.rsplit("=", 1)[0]
            kind = "arithmetic error" if same_operands else "wrong order of operations"
            start = offset
            break
    if kind is None:
        think = _THINK.search(completion)
        if think is None:
            kind, start = "no steps", 0
        else:
            start = think.end(1)
            if len(written) < len(problem.steps):
                kind = "missing step"
            else:
                kind = "wrong answer" if parse_answer(completion) is not None else "missing answer"
    lines = [line for line in completion[start:].splitlines() if line.strip()]
    return "\n".join([kind, *lines])
