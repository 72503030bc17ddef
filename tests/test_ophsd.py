"""OPHSD (On-Policy Harness Self-Distillation, arXiv 2605.08741; methods `ophsd` and `ophsd-scripted`): a harness run
with the current policy writes the teacher's context (`privileged_source="harness"`: a plan, or a draft and its
verification, once per group), the teacher is frozen at the initial weights and the loss is the full-vocabulary
reverse KL(p_S || p_T) with no reward term. Pinned: the source's requests and fields on a tiny case, the embedded
task's scripted harness, the method's resolved loss, and a one-step run without reward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset

from rlsd.context.generated import GenerationRequest, context_generator
from rlsd.context.harness import (
    DRAFT_PROMPT,
    HARNESS_KNOBS,
    HARNESS_TEACHER_TEMPLATE,
    NO_HARNESS_TEXT,
    PLAN_PROMPT,
    VERIFY_PROMPT,
    HarnessSource,
)
from rlsd.context.sources import RolloutView
from rlsd.experiments.contexts import plan_steps, task_harness, task_problem
from rlsd.experiments.demo import DemoConfig, trainer_args
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import Problem, TaskConfig, make_rl_dataset
from rlsd.plan import Stages


def zero_reward(completions, **kwargs):
    """No completion is ever rewarded: every GRPO advantage is 0."""
    return [0.0] * len(completions)


def args(**values):
    return SimpleNamespace(**{**{k: knob.default for k, knob in HARNESS_KNOBS.items()}, **values})


def view(prompts, group_size=2, generate=None):
    """A rollout of `group_size` completions per prompt (each prompt's rows next to each other)."""
    rows = [{"prompt": prompt, "solution": str(k)} for k, prompt in enumerate(prompts) for _ in range(group_size)]
    return RolloutView(rows, group_size, generate=generate)


class Recorder:
    """A model generator (`RolloutView.generate`): records each batch it is asked and answers from `reply`."""

    def __init__(self, reply):
        self.batches, self.reply = [], reply

    def __call__(self, prompts, model="policy"):
        self.batches.append((list(prompts), model))
        return [self.reply(prompt) for prompt in prompts]


# ----------------------------------------------------------------------------------------------- the source
def test_the_plan_harness_asks_the_policy_once_per_group_and_fills_the_field():
    policy = Recorder(lambda prompt: f"plan of {prompt.splitlines()[1]}")
    source = HarnessSource(args())
    context = source.context(view(["Q: 1+2=", "Q: 3*4="], generate=policy), [0, 1, 2, 3])
    # one batched call, one prompt per group: the plan request around the rollout's prompt
    assert policy.batches == [([PLAN_PROMPT.format(prompt="Q: 1+2="), PLAN_PROMPT.format(prompt="Q: 3*4=")], "policy")]
    assert PLAN_PROMPT.startswith("Problem:\n{prompt}\n\nDo not solve the problem. Write a short plan")
    assert context.fields == {"harness": ["Plan: plan of Q: 1+2="] * 2 + ["Plan: plan of Q: 3*4="] * 2}
    assert context.has_context == [True] * 4
    assert context.metrics["context_generator_calls"] == 1.0 and context.metrics["harness_runs"] == 2.0
    assert context.metrics["context_fallback_count"] == 0.0
    rendered = HARNESS_TEACHER_TEMPLATE.format(harness=context.fields["harness"][0], prompt="Q: 1+2=")
    assert rendered == "Plan: plan of Q: 1+2=\n\nWith this in mind, solve the following problem yourself.\n\nQ: 1+2="


def test_the_draft_harness_asks_for_a_draft_then_its_verification_and_a_teacher_generator_is_honoured():
    def reply(prompt):
        return "checked" if "Verify the draft" in prompt else "draft " + prompt.splitlines()[1]

    teacher = Recorder(reply)
    source = HarnessSource(args(harness="draft", context_generator="teacher"))
    context = source.context(view(["Q: 1+2=", "Q: 3*4="], generate=teacher), [1, 2, 3])
    drafts, verifies = teacher.batches
    assert drafts == ([DRAFT_PROMPT.format(prompt="Q: 1+2="), DRAFT_PROMPT.format(prompt="Q: 3*4=")], "teacher")
    assert verifies[0] == [VERIFY_PROMPT.format(prompt=p, draft=f"draft {p}") for p in ("Q: 1+2=", "Q: 3*4=")]
    first, second = (f"Draft: draft {p}\nVerification: checked" for p in ("Q: 1+2=", "Q: 3*4="))
    assert context.fields["harness"] == [first, second, second]  # rows 1, 2, 3
    assert context.metrics["context_generator_calls"] == 2.0 and context.metrics["harness_runs"] == 2.0


def test_an_empty_stage_leaves_its_group_without_context_and_the_later_stage_skips_it():
    policy = Recorder(lambda prompt: "" if "Q: 1+2=" in prompt and "Verify" not in prompt else "fine")
    context = HarnessSource(args(harness="draft")).context(view(["Q: 1+2=", "Q: 3*4="], generate=policy), [0, 1, 2, 3])
    assert [len(prompts) for prompts, _ in policy.batches] == [2, 1]  # the empty draft is not verified
    assert context.has_context == [False, False, True, True]
    assert context.fields["harness"][:2] == [NO_HARNESS_TEXT] * 2
    assert context.metrics["context_fallback_count"] == 2.0  # rows


def test_groups_are_runs_of_one_prompt_at_most_group_size_long_and_chat_turns_are_kept(registries):
    seen = []

    @context_generator("test-harness")
    def record(request: GenerationRequest) -> str:
        seen.append(request)
        return f"p{len(seen)}"

    # rows 0-1: the tail of a group split across processes; 2-5: two groups of the same prompt; 6-7 another prompt
    prompts = ["Q: 1+2="] * 6 + ["Q: 3*4="] * 2
    rows = [{"prompt": prompt} for prompt in prompts]
    source = HarnessSource(args(context_generator="test-harness"))
    context = source.context(RolloutView(rows, 4), range(8))
    assert context.fields["harness"] == ["Plan: p1"] * 4 + ["Plan: p2"] * 2 + ["Plan: p3"] * 2
    assert [request.stage for request in seen] == ["plan"] * 3 and seen[0].source == "harness"
    assert context.metrics["context_generator_calls"] == 3.0  # a function is called once per group
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 5-1="}]
    seen.clear()
    source.context(RolloutView([{"prompt": chat}], 1), [0])
    assert seen[0].prompt == [chat[0], {"role": "user", "content": PLAN_PROMPT.format(prompt="Q: 5-1=")}]


def test_the_harness_knob_is_a_config_field_with_its_check(tmp_path):
    config = make_config(tmp_path, privileged_source="harness")
    assert (config.harness, config.context_generator, config.teacher_template) == (
        "plan", "policy", HARNESS_TEACHER_TEMPLATE
    )  # fmt: skip
    with pytest.raises(ValueError, match="harness must be one of plan, draft, got 'solve'"):
        make_config(tmp_path, privileged_source="harness", harness="solve")


# ---------------------------------------------------------------------------------- the embedded task's harness
def test_the_task_harness_writes_the_checkers_steps_in_order():
    def stage(name, prompt="Q: 3+4*5-2=", solution="21"):
        return task_harness(GenerationRequest("", {"prompt": prompt, "solution": solution}, stage=name))

    assert stage("plan") == "4*5;3+#1;#2-2"  # products first, no result shown
    assert stage("draft") == "4*5=20;3+20=23;23-2=21"
    assert stage("verify") == "4*5=20 ok;3+20=23 ok;23-2=21 ok;answer 21"
    assert stage("plan", "Q: 2*3+4*5-1=", "25") == "2*3;4*5;#1+#2;#3-1"
    assert stage("plan", solution="33") == "3+4;#1*5;#2-2"  # the left-to-right reading gives the row's answer
    problem = Problem((7, 2, 3), ("-", "*"))
    assert plan_steps(problem) == ["2*3", "7-#1"] and task_problem({"prompt": problem.prompt}) == problem
    with pytest.raises(ValueError, match="no semantics of the task gives the solution '5'"):
        stage("plan", solution="5")
    with pytest.raises(ValueError, match="writes the stages plan, draft and verify, not 'solve'"):
        stage("solve")


def test_the_scripted_methods_teacher_prompt(tokenizer, tmp_path):
    dataset = make_rl_dataset(TaskConfig(num_operands=3), 8, seed=0)
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=dataset, **CATALOGUE["ophsd-scripted"])
    rows = [dataset[0]] * 2
    ids, mask, _, has_context = trainer.teacher_inputs(rows, {"prompt_ids": None}, "train")
    assert has_context.all()
    problem = task_problem(dataset[0])
    expected = f"[Plan: {';'.join(plan_steps(problem))}] {problem.prompt}"
    assert [tokenizer.decode(row[keep.bool()]) for row, keep in zip(ids, mask, strict=True)] == [expected] * 2


# ------------------------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("method", ["ophsd", "ophsd-scripted"])
def test_the_method_is_reverse_kl_from_the_initial_teacher_without_policy_loss(method):
    config = trainer_args(DemoConfig(), method)  # the demo's config: its default answer template is replaced
    assert (config.credit, config.policy_loss_coef, config.teacher) == ("grpo", 0.0, "initial")
    assert (config.distill_loss, config.distill_jsd_beta, config.distill_coef) == ("jsd", 1.0, 1.0)
    assert (config.privileged_source, config.harness) == ("harness", "plan")
    assert config.context_generator == {"ophsd": "policy", "ophsd-scripted": "task-harness"}[method]
    # the loss the run builds is KL(p_S || p_T) = sum_v p_S (log p_S - log p_T), in value and student gradient
    loss_fn = Stages(config, row_subsets=True).plan(None).distill_fn
    generator = torch.Generator().manual_seed(0)
    student = torch.randn((2, 3, 11), generator=generator, dtype=torch.float64)
    teacher = torch.randn((2, 3, 11), generator=generator, dtype=torch.float64)
    ours, reference = student.clone().requires_grad_(), student.clone().requires_grad_()
    value = loss_fn(ours, teacher)
    log_s, log_t = reference.log_softmax(-1), teacher.log_softmax(-1)
    expected = (log_s.exp() * (log_s - log_t)).sum(-1)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad)


def test_one_step_of_ophsd_without_reward_is_distillation_alone(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=make_dataset(), **CATALOGUE["ophsd"])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert log["reward"] == 0.0 and log["reward_std"] == 0.0  # every advantage 0, and no policy loss anyway
    assert log["rlsd/harness_runs"] == 1.0 and log["rlsd/context_generator_calls"] == 1.0  # one group, one plan
    assert log["rlsd/distill_loss"] > 0.0 and log["loss"] == pytest.approx(log["rlsd/distill_loss"], rel=1e-3)
    assert log["grad_norm"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
