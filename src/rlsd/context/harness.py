"""`HarnessSource` ("harness"): OPHSD's teacher context (On-Policy Harness Self-Distillation, arXiv 2605.08741), what
an inference-time harness run with the current policy worked out for the problem.

OPHSD runs a harness on the policy's current weights for each training prompt and shows the harness's context to the
teacher, the model frozen at its initial weights; the student, given the bare prompt, is distilled towards that
teacher by reverse KL over the full vocabulary, with no reward term (the method `ophsd`: `teacher="initial"`,
`distill_loss="jsd"` with `distill_jsd_beta=1.0`, `policy_loss_coef=0.0`). `harness` chooses the harness:

- "plan" (plan-then-solve, the paper's math harness): the generator is asked for a plan of the problem, not its
  solution. The paper's teacher is shown the plan with the problem and asked to solve it; here the plan comes
  before the problem (`HARNESS_TEACHER_TEMPLATE`).
- "draft" (draft-then-verify, the paper's text-classification harness): the generator is asked for a draft
  solution, then for a verification of that draft; the teacher sees both. The paper's verify step also shows
  labelled neighbours retrieved from a memory bank of training examples, confirming or challenging the draft; this
  source has no memory bank: the verification is the generator's own.

The generator (`context_generator`: "policy", the paper's, "teacher", or a function) completes each stage's prompt
(`HARNESS_STAGES`), built from the rollout's prompt: its last user turn rewritten, every other turn kept, and the
earlier stages' outputs filled in. A function generator is called once per stage with `GenerationRequest.stage`
naming it. The paper's code can also show its harness the reference solution and answer (its `use_gt`); this
source does not: the harness reads the prompt alone (a function generator gets the dataset row).

The harness runs once per group and its output is shared by the group's completions: the paper runs it once per
prompt (with one completion per prompt there), and its output depends on the prompt alone. A group is a run of
consecutive rows with the same prompt, at most `group_size` long (TRL places a prompt's completions next to each
other); a group split across processes gets one run on each process holding part of it. A stage that comes back
empty leaves its group without context (the paper drops a sample whose harness returned nothing): counted in
`rlsd/context_fallback_count` (rows), beside `rlsd/harness_runs` and the generator's calls and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from rlsd.context.generated import GENERATED_KNOBS, GeneratedSource, GenerationRequest
from rlsd.context.sources import Context, RolloutView, privileged_source
from rlsd.context.templates import render_teacher_prompt
from rlsd.core.rules import Knob

PLAN_PROMPT = (
    "Problem:\n{prompt}\n\n"
    "Do not solve the problem. Write a short plan for solving it: the ideas it needs, its main steps in order, and "
    "the mistakes to avoid."
)
"""What the generator is asked in the plan harness (the paper's plan agent): a plan, not a solution."""
DRAFT_PROMPT = "Problem:\n{prompt}\n\nWrite a draft solution to this problem, ending with its answer."
"""The first stage of the draft harness: a draft solution."""
VERIFY_PROMPT = (
    "Problem:\n{prompt}\n\n"
    "Draft solution:\n{draft}\n\n"
    "Verify the draft: check each of its steps and its answer, say which are wrong and why, and give the corrected "
    "answer if it is wrong."
)
"""The second stage of the draft harness: a verification of the draft (`{draft}`)."""

HARNESS_STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "plan": (("plan", PLAN_PROMPT),),
    "draft": (("draft", DRAFT_PROMPT), ("verify", VERIFY_PROMPT)),
}
"""Each harness's stages, in order: the stage's name (`GenerationRequest.stage`, and the field its output fills in
the later stages' prompts and in `HARNESS_OUTPUTS`) and its prompt, around the rollout prompt's last user turn."""
HARNESS_OUTPUTS = {"plan": "Plan: {plan}", "draft": "Draft: {draft}\nVerification: {verify}"}
"""What `{harness}` shows of each harness's run."""
HARNESS_TEACHER_TEMPLATE = "{harness}\n\nWith this in mind, solve the following problem yourself.\n\n{prompt}"
"""The default teacher template of `privileged_source="harness"`: the harness's output, then the student's prompt."""
NO_HARNESS_TEXT = "(the harness wrote nothing)"
"""`{harness}` of a row whose harness run came back empty (the row has no context: it is not distilled)."""


def _harness_name(value: Any) -> str | None:
    """A knob check: one of `HARNESS_STAGES`."""
    return None if value in HARNESS_STAGES else f"must be one of {', '.join(HARNESS_STAGES)}, got {value!r}"


HARNESS_KNOBS = {
    **GENERATED_KNOBS,
    "harness": Knob(
        "plan",
        'With privileged_source="harness" (OPHSD), the harness the generator runs: "plan" (plan-then-solve: a plan '
        'of the problem) or "draft" (draft-then-verify: a draft solution, then a verification of it).',
        _harness_name,
    ),
}


def harness_groups(view: RolloutView, rows: Sequence[int]) -> list[list[int]]:
    """The rows of `rows` that share one harness run: runs of consecutive rows with the same prompt, each at most
    `view.group_size` long."""
    groups: list[list[int]] = []
    for i in rows:
        key = repr(view.rows[i]["prompt"])
        if groups and len(groups[-1]) < view.group_size and repr(view.rows[groups[-1][0]]["prompt"]) == key:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@privileged_source
class HarnessSource(GeneratedSource):
    """What a harness run on the problem wrote (see the module docstring): a plan, or a draft and its verification,
    once per group."""

    name = "harness"
    fills = ("harness",)
    default_template = HARNESS_TEACHER_TEMPLATE
    needs_completions = False  # the harness reads the prompt alone
    falls_back = True
    generated_fields: ClassVar[dict[str, str]] = {"harness": NO_HARNESS_TEXT}
    knobs = HARNESS_KNOBS

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        groups = harness_groups(view, rows)
        outputs, metrics = self.run(view, [group[0] for group in groups])
        output_of = {i: output for group, output in zip(groups, outputs, strict=True) for i in group}
        has_context = [output_of[i] is not None for i in rows]
        texts = [NO_HARNESS_TEXT if output_of[i] is None else output_of[i] for i in rows]
        metrics = {**metrics, "harness_runs": float(len(groups)),
                   "context_fallback_count": float(sum(not has for has in has_context))}  # fmt: skip
        return Context({"harness": texts}, has_context, metrics)

    def run(self, view: RolloutView, leaders: Sequence[int]) -> tuple[list[str | None], dict[str, float]]:
        """The harness on each row of `leaders` (one per group): each stage is one request per row (one batched call
        for a model generator, made on every process even with nothing to ask), its prompt built from the row's
        prompt and the earlier stages' outputs; a row whose stage came back empty stops there (None). Returns each
        row's `HARNESS_OUTPUTS` text and the generator's calls and time over the stages, with the share of the texts
        that contain the row's answer (`answer_share`)."""
        harness = self.args.harness
        outputs: list[dict[str, str] | None] = [{} for _ in leaders]
        calls = seconds = 0.0
        for stage, template in HARNESS_STAGES[harness]:
            live = [k for k, done in enumerate(outputs) if done is not None]
            requests = [
                GenerationRequest(
                    render_teacher_prompt(view.rows[leaders[k]]["prompt"], template, **outputs[k]),
                    dict(view.rows[leaders[k]]),
                    source=self.name,
                    stage=stage,
                )
                for k in live
            ]
            texts, metrics = self.generate(view, [leaders[k] for k in live], requests)
            calls += metrics["context_generator_calls"]
            seconds += metrics["context_generator_time_s"]
            for k, text in zip(live, texts, strict=True):
                if text is None:
                    outputs[k] = None
                else:
                    outputs[k][stage] = text
        written = [None if done is None else HARNESS_OUTPUTS[harness].format(**done) for done in outputs]
        shown = self.requests(view, leaders, lambda i: None)  # the rows, for their answers
        return written, {"context_generator_calls": calls, "context_generator_time_s": seconds,
                         **self.answer_share(shown, written)}  # fmt: skip
