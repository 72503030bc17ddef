"""`ReflectionSource` ("reflection"): RESD's privileged context (Reflection-Enhanced Self-Distillation, arXiv
2605.12741): a reflection written on every failed rollout from the verifier's feedback, and a persistent playbook of
lessons curated across steps.

Each completion whose weighted total reward is at most `reflection_reward_threshold` failed; the generator
(`context_generator`: the policy, as in the paper, the teacher, or a function such as the embedded task's
`"task-reflection"`) is asked for a reflection on it under `reflection_instruction`: the problem, the failed attempt,
the verifier's feedback (its reward and, with `reflection_show_answer`, the reference answer, as the paper's FiNER
feedback gives it) and the current playbook. On a training rollout the lesson of each reflection (what follows
its last `Lesson:`, else its last line) is curated into the playbook, every process's in row order: the playbook
keeps the `playbook_size` most recent distinct lessons (a lesson written again moves to the newest place, the oldest
is dropped). The teacher is shown the playbook, the row's reflection and a successful attempt of the row's group
(the row's own when it succeeded), the context of the paper's teacher. The playbook is the source's state
(`state_dict`): saved in every checkpoint and restored on resume. Each row's weight in the distillation term is
RESD's batch-success weight (`batch_success_weights`).

What is the paper's code (horizon-llm/RESD) and what is reconstructed here is listed in the README ("RESD"): its
curator is a second model call that turns a reflection into playbook edits, its reflector tags each lesson helpful or
harmful, and a full playbook drops harmful and stale lessons first; here the curation is the recency rule above.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from accelerate.utils import gather_object

from rlsd.context.generated import (
    GENERATED_KNOBS,
    GeneratedSource,
    _positive_int,
    chat_turn,
    finite_number,
    instruction_check,
    no_context_frac,
)
from rlsd.context.sources import Context, RolloutView, check_privileged_column, privileged_source
from rlsd.core.credit import TokenMean
from rlsd.core.rules import Knob

REFLECTION_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Lessons learned from earlier attempts:\n{playbook}\n\n"
    "A reflection on a previous attempt at this problem:\n{reflection}\n\n"
    "A successful attempt:\n{success}\n\n"
    "Using these, solve the problem correctly with your own approach below."
)
"""The teacher prompt of `privileged_source="reflection"`: the playbook, the row's reflection and a successful attempt
of its group (the paper's teacher sees them beside its previous trial and the environment's feedback)."""

REFLECTION_INSTRUCTION = (
    "An attempt at the problem below failed. Using the verifier's feedback, find where the attempt went wrong and "
    "what it should have done instead. End with one line 'Lesson: <a short rule that avoids this mistake next "
    "time>'.\n\n"
    "Problem:\n{prompt}\n\n"
    "Attempt:\n{completion}\n\n"
    "Verifier's feedback:\n{feedback}\n\n"
    "Lessons learned so far:\n{playbook}"
)
"""What a model generator is asked for each failed row: `{prompt}` the student's prompt (its last user turn),
`{completion}` the failed attempt, `{feedback}` the verifier's feedback, `{playbook}` the current playbook."""
INSTRUCTION_FIELDS = ("prompt", "completion", "feedback", "playbook")

NO_LESSONS_TEXT = "(no lessons yet)"
NO_REFLECTION_TEXT = "(no reflection)"
NO_SUCCESS_TEXT = "(no successful attempt yet)"
_LESSON_RE = re.compile(r"\blesson\s*[*_]*\s*:[\s*_]*([^\n]+)", re.IGNORECASE)


_instruction = instruction_check(INSTRUCTION_FIELDS)
_finite = finite_number


def _non_negative(value: Any) -> str | None:
    """A knob check: a finite number >= 0."""
    problem = _finite(value)
    return problem or (None if value >= 0 else f"must be >= 0, got {value!r}")


def _boolean(value: Any) -> str | None:
    """A knob check: True or False."""
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


REFLECTION_KNOBS = {
    **GENERATED_KNOBS,
    "reflection_reward_threshold": Knob(
        0.0, "With privileged_source='reflection', a completion whose total (weighted) reward is at most this failed: "
        "it gets a reflection; one above it succeeded (shown to its group's teacher, weighed as a success).", _finite,
    ),
    "reflection_instruction": Knob(
        REFLECTION_INSTRUCTION, "With privileged_source='reflection', what a model generator is asked for each failed "
        "row: {completion} is the attempt, {prompt} the student's prompt (its last user turn), {feedback} the "
        "verifier's feedback, {playbook} the current playbook.", _instruction,
    ),
    "reflection_show_answer": Knob(
        True, "With privileged_source='reflection', the verifier's feedback a reflection is written from shows the "
        "reference answer (privileged_column), as the paper's FiNER feedback does.", _boolean,
    ),
    "playbook_size": Knob(
        20, "With privileged_source='reflection', the most lessons the playbook keeps: the most recent distinct ones "
        "(the paper's runs keep 120 to 200, with teacher prompts of up to 58k tokens).", _positive_int,
    ),
    "playbook_lesson_chars": Knob(
        200, "With privileged_source='reflection', the longest lesson the playbook keeps, in characters: a longer one "
        "is cut at a word boundary.", _positive_int,
    ),
    "batch_success_weights": Knob(
        True, "With privileged_source='reflection', RESD's batch-success weights weigh each row in the distillation "
        "term: (1 - s)^alpha for a success, s^beta for a failure, s the rollout batch's success rate (clipped to "
        "[1/B, 1 - 1/B]), normalized to mean 1 over the batch.", _boolean,
    ),
    "batch_success_alpha": Knob(
        1.0, "alpha of batch_success_weights: a success weighs (1 - s)^alpha.", _non_negative
    ),
    "batch_success_beta": Knob(1.0, "beta of batch_success_weights: a failure weighs s^beta.", _non_negative),
}  # fmt: skip


def batch_success_weights(
    rewards: Sequence[float], threshold: float, alpha: float = 1.0, beta: float = 1.0
) -> list[float]:
    """RESD's per-row weights of a rollout batch (its code's `success_rate_weighting`): with s the share of rewards
    above `threshold`, clipped to [1/B, 1 - 1/B], a success weighs (1 - s)^alpha and a failure s^beta, normalized to
    mean 1 over the batch (all 1 when every weight is 0). The rarer the successes, the more each weighs; a batch of
    failures weighs 1 each."""
    count = len(rewards)
    if count == 0:
        return []
    success = [reward > threshold for reward in rewards]
    rate = min(max(sum(success) / count, 1.0 / count), 1.0 - 1.0 / count)
    raw = [(1.0 - rate) ** alpha if won else rate**beta for won in success]
    mean = sum(raw) / count
    return [weight / mean for weight in raw] if mean > 1e-8 else [1.0] * count


def lesson_of(reflection: str, max_chars: int) -> str | None:
    """The lesson a reflection teaches: what follows its last `Lesson:` (to the end of that line), else its last
    non-empty line, on one line and cut at a word boundary to `max_chars` (an ellipsis marks the cut); None for a
    blank reflection."""
    found = _LESSON_RE.findall(reflection)
    lines = [line for line in reflection.splitlines() if line.strip()]
    text = found[-1] if found else (lines[-1] if lines else "")
    text = " ".join(text.strip("*_` ").split())
    if not text:
        return None
    if len(text) > max_chars:
        cut = text[: max(max_chars - 3, 1)]
        space = cut.rfind(" ")
        text = (cut[:space] if space > len(cut) // 2 else cut).rstrip() + "..."
    return text


def _key(lesson: str) -> str:
    """Two lessons are the same when they differ only in case, spacing and final punctuation."""
    return " ".join(lesson.casefold().split()).rstrip(".!;,")


@dataclass
class Playbook:
    """A bounded list of lessons, oldest first: `curate` adds lessons in order, a lesson already held moves to the
    newest place, and only the `size` most recent distinct lessons are kept. `updates`: training batches curated."""

    size: int
    lessons: list[str] = field(default_factory=list)
    updates: int = 0

    def curate(self, lessons: Iterable[str]) -> None:
        """Add one training batch's lessons, in order."""
        for lesson in lessons:
            key = _key(lesson)
            self.lessons = [held for held in self.lessons if _key(held) != key]
            self.lessons.append(lesson)
        del self.lessons[: max(0, len(self.lessons) - self.size)]
        self.updates += 1

    def render(self) -> str:
        """The playbook as the teacher and the reflector read it: one `- lesson` line each, oldest first."""
        return "\n".join(f"- {lesson}" for lesson in self.lessons) if self.lessons else NO_LESSONS_TEXT

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "lessons": list(self.lessons), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved playbook; one saved with a larger `playbook_size` keeps its most recent lessons."""
        lessons, updates = state.get("lessons"), state.get("updates", 0)
        if not isinstance(lessons, list) or not all(isinstance(lesson, str) for lesson in lessons):
            raise ValueError(f"the saved playbook's lessons are not a list of strings: {lessons!r}")
        if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
            raise ValueError(f"the saved playbook's update count is not an integer >= 0: {updates!r}")
        self.lessons, self.updates = lessons[max(0, len(lessons) - self.size) :], updates


def prompt_text(prompt: Any) -> str:
    """The student's prompt as text: a plain prompt itself, a conversation's last user turn (its text blocks)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, str):
                return content
            return "\n".join(block.get("text", "") for block in content if block.get("type") == "text")
    raise ValueError("a conversational prompt has no user turn to reflect on")


@privileged_source
class ReflectionSource(GeneratedSource):
    """RESD's teacher context: the playbook, the row's reflection and a successful attempt (see the module
    docstring)."""

    name = "reflection"
    fills = ("playbook", "reflection", "success")
    default_template = REFLECTION_TEACHER_TEMPLATE
    knobs = REFLECTION_KNOBS
    falls_back = True  # an empty reflection leaves the row without one (counted), not the run stopped
    generated_fields: ClassVar[dict[str, str]] = {"reflection": NO_REFLECTION_TEXT}  # the lessons are cut from them

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.playbook = Playbook(args.playbook_size)

    def check_dataset(self, dataset: Any, split_name: str) -> None:
        if self.args.reflection_show_answer:
            check_privileged_column(dataset, self.args.privileged_column, split_name)

    def state_dict(self) -> dict[str, Any]:
        return self.playbook.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.playbook.load_state_dict(state)

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        rewards, threshold = list(view.rewards), self.args.reflection_reward_threshold
        failed = [i for i in rows if rewards[view.offset + i] <= threshold]
        shown = self.playbook.render()
        requests = self.requests(view, failed, lambda i: self.request_prompt(view, i, shown))
        texts, metrics = self.generate(view, failed, requests)
        reflections = {i: text for i, text in zip(failed, texts, strict=True) if text is not None}
        if view.mode == "train":  # evaluation reads the playbook, never curates it
            self.curate(view, reflections)
        successes = self.successes(view, rows)
        fields = {
            "playbook": [self.playbook.render()] * len(rows),
            "reflection": [reflections.get(i, NO_REFLECTION_TEXT) for i in rows],
            "success": [NO_SUCCESS_TEXT if text is None else text for text in successes],
        }
        has_context = [
            i in reflections or text is not None or bool(self.playbook.lessons)
            for i, text in zip(rows, successes, strict=True)
        ]
        weights = None
        if self.args.batch_success_weights:
            everyone = batch_success_weights(
                rewards, threshold, self.args.batch_success_alpha, self.args.batch_success_beta
            )
            weights = [everyone[view.offset + i] for i in rows]
        metrics.update(
            reflection_count=float(len(reflections)),
            playbook_lessons=TokenMean(float(len(self.playbook.lessons)), 1),
            batch_success_rate=TokenMean(sum(reward > threshold for reward in rewards) / max(len(rewards), 1), 1),
            no_context_frac=no_context_frac(has_context),
        )
        return Context(fields, has_context, metrics, weights)

    def request_prompt(self, view: RolloutView, row: int, playbook: str) -> Any:
        """What a model generator is asked about the failed local row `row`: `reflection_instruction` filled in,
        as a chat turn when the dataset's prompts are conversations."""
        prompt = view.rows[row]["prompt"]
        reward = view.rewards[view.offset + row]
        feedback = f"The attempt failed (reward {reward:g})."
        if self.args.reflection_show_answer:
            column = self.args.privileged_column
            if column not in view.rows[row]:
                raise KeyError(f"rollout row {row} has no privileged column {column!r} to show the reflector")
            feedback += f" The correct answer is {view.rows[row][column]}."
        text = self.args.reflection_instruction.format(
            prompt=prompt_text(prompt), completion=view.completion_texts[view.offset + row], feedback=feedback,
            playbook=playbook,
        )  # fmt: skip
        return chat_turn(prompt, text)

    def curate(self, view: RolloutView, reflections: dict[int, str]) -> None:
        """Curate the lessons of one training rollout's reflections into the playbook: every process's, gathered in
        row order (a collective), so that every process keeps the same playbook."""
        limit = self.args.playbook_lesson_chars
        local = [(view.offset + i, lesson_of(text, limit)) for i, text in sorted(reflections.items())]
        everyone = sorted(item for item in gather_object(local) if item[1] is not None)
        self.playbook.curate(lesson for _, lesson in everyone)

    def successes(self, view: RolloutView, rows: Sequence[int]) -> list[str | None]:
        """For each local row in `rows`, the first completion of its group whose reward is above the threshold (the
        row's own when it succeeded; groups may span processes), None when none succeeded."""
        rewards, texts, size = view.rewards, view.completion_texts, view.group_size
        threshold = self.args.reflection_reward_threshold
        picked = []
        for i in rows:
            first = view.offset + i - (view.offset + i) % size
            winners = [j for j in range(first, first + size) if rewards[j] > threshold]
            picked.append(texts[winners[0]] if winners else None)
        return picked
