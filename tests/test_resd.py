"""RESD (Reflection-Enhanced Self-Distillation, arXiv 2605.12741; methods `resd`, `resd-scripted`): a reflection on
every failed rollout, a playbook of lessons curated across steps and saved in checkpoints (`ReflectionSource`), the
top-k reverse KL with the teacher's probabilities clipped from below (`distill_loss="resd_topk"`) and the batch-success
weights. Pinned on hand-made rollouts and by hand, then in a trainer: it trains when no completion is rewarded, and
the playbook survives a checkpoint, a resume and a `kill -9`."""

from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_config, run_killed_while_saving

from rlsd.context.generated import GenerationRequest, context_generator
from rlsd.context.prompts import RolloutTap
from rlsd.context.reflection import (
    NO_LESSONS_TEXT,
    NO_REFLECTION_TEXT,
    NO_SUCCESS_TEXT,
    REFLECTION_KNOBS,
    Playbook,
    ReflectionSource,
    batch_success_weights,
    lesson_of,
)
from rlsd.context.sources import AnswerSource, RolloutView
from rlsd.core.distill import token_loss_fn
from rlsd.core.family_losses import resd_topk_reverse_kl
from rlsd.experiments.contexts import task_reflection
from rlsd.experiments.demo import DemoConfig, trainer_args
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import TaskConfig, make_rl_dataset
from rlsd.infra.checkpoint import (
    MANIFEST_FILE,
    PARTIAL_PREFIX,
    SOURCE_STATE_FILE,
    load_rlsd_state,
    rlsd_state_files,
    save_rlsd_state,
)
from rlsd.infra.validate import CheckpointError
from rlsd.plan import Stages


def args(**values):
    """The reflection source's knobs at their defaults (and the answer column), `values` over them."""
    defaults = {key: knob.default for key, knob in REFLECTION_KNOBS.items()}
    return SimpleNamespace(**{**defaults, "privileged_column": "solution", **values})


def view(rewards, group_size=2, mode="train", generate=None, offset=0):
    """A rollout of one completion per reward, rows `p<i>` with answers `a<i>` and completions `c<i>`."""
    n = len(rewards)
    rows = [{"prompt": f"p{i}", "solution": f"a{i}"} for i in range(n)]
    return RolloutView(rows, group_size, offset, [f"c{i}" for i in range(n)], list(rewards), generate, mode)


def lesson_generator(seen):
    """A function generator that records each request and writes `Lesson: <prompt>`."""

    def write(request: GenerationRequest) -> str:
        seen.append(request)
        return f"Diagnosis of {request.completion}.\nLesson: avoid {request.row['prompt']}"

    return write


# ------------------------------------------------------------------------------------------------ the source
def test_reflections_are_written_on_failed_rows_only_and_the_teacher_sees_what_the_paper_shows(registries):
    seen = []
    context_generator("test-lessons")(lesson_generator(seen))
    source = ReflectionSource(args(context_generator="test-lessons"))
    context = source.context(view([1.0, 0.0, 0.0, 0.0, 0.5, 0.0]), range(6))
    assert [request.row["prompt"] for request in seen] == ["p1", "p2", "p3", "p5"]  # reward <= 0: failed
    assert [(r.completion, r.reward) for r in seen][:2] == [("c1", 0.0), ("c2", 0.0)]
    reflections = context.fields["reflection"]
    assert reflections[0] == reflections[4] == NO_REFLECTION_TEXT
    assert reflections[1] == "Diagnosis of c1.\nLesson: avoid p1"
    # a successful attempt of the row's group, its own when it succeeded; none in a group of failures
    assert context.fields["success"] == ["c0", "c0", NO_SUCCESS_TEXT, NO_SUCCESS_TEXT, "c4", "c4"]
    # the playbook the teacher sees already holds this batch's lessons, in row order
    assert context.fields["playbook"][0] == "- avoid p1\n- avoid p2\n- avoid p3\n- avoid p5"
    assert context.has_context == [True] * 6
    assert context.metrics["reflection_count"] == 4.0 and context.metrics["playbook_lessons"] == 4.0
    assert context.metrics["batch_success_rate"] == pytest.approx(2 / 6)


def test_a_model_reflector_is_asked_with_the_verifiers_feedback_and_evaluation_never_curates():
    asked = []

    def generate(prompts, model="policy"):
        asked.append((list(prompts), model))
        return ["Lesson: check the sign." for _ in prompts]

    source = ReflectionSource(args())  # the policy writes the reflections (the paper's setting)
    source.context(view([0.0, 1.0], generate=generate), [0, 1])
    ((prompts, model),) = asked
    assert model == "policy" and len(prompts) == 1
    assert "Problem:\np0" in prompts[0] and "Attempt:\nc0" in prompts[0]
    assert "The attempt failed (reward 0). The correct answer is a0." in prompts[0]
    assert "Lessons learned so far:\n" + NO_LESSONS_TEXT in prompts[0]
    assert source.playbook.lessons == ["check the sign."]
    hidden = ReflectionSource(args(reflection_show_answer=False))
    hidden.context(view([0.0, 1.0], generate=generate), [0, 1])
    assert "correct answer" not in asked[-1][0][0]
    # an evaluation rollout gets reflections but leaves the playbook as training left it
    evaluated = source.context(view([0.0, 0.0], generate=lambda p, m="policy": ["Lesson: new"] * len(p), mode="eval"),
                               [0, 1])  # fmt: skip
    assert source.playbook.lessons == ["check the sign."] and evaluated.fields["reflection"] == ["Lesson: new"] * 2
    assert source.playbook.updates == 1


def test_the_playbook_keeps_the_most_recent_distinct_lessons_over_a_sequence_of_batches(registries):
    playbook = Playbook(size=3)
    playbook.curate(["a", "b"])
    playbook.curate(["c", "A."])  # "A." is "a" again: it moves to the newest place
    assert playbook.lessons == ["b", "c", "A."]
    playbook.curate(["d"])  # over the size: the oldest goes
    assert playbook.lessons == ["c", "A.", "d"]
    playbook.curate(["e", "f", "g", "e"])
    assert playbook.lessons == ["f", "g", "e"] and playbook.updates == 3 + 1
    playbook.curate([])
    assert playbook.render() == "- f\n- g\n- e" and playbook.updates == 5
    assert Playbook(size=2).render() == NO_LESSONS_TEXT

    # through the source: batch after batch, the lessons of the failed rows in row order
    context_generator("test-lessons")(lesson_generator([]))
    source = ReflectionSource(args(context_generator="test-lessons", playbook_size=3))
    batches = [([0.0, 1.0, 0.0, 1.0], ["avoid p0", "avoid p2"]), ([1.0, 1.0, 1.0, 1.0], ["avoid p0", "avoid p2"]),
               ([1.0, 0.0, 1.0, 0.0], ["avoid p2", "avoid p1", "avoid p3"]),
               ([0.0, 1.0, 1.0, 1.0], ["avoid p1", "avoid p3", "avoid p0"])]  # fmt: skip
    for rewards, expected in batches:
        source.context(view(rewards), range(4))
        assert source.playbook.lessons == expected
    assert source.state_dict() == {"format": 1, "lessons": ["avoid p1", "avoid p3", "avoid p0"], "updates": 4}


def test_a_lesson_is_the_last_lesson_line_or_the_last_line_cut_at_a_word():
    assert lesson_of("x\n**Lesson:** carry the one.\nmore", 100) == "carry the one."
    assert lesson_of("Lesson: a\n- lesson: b  c", 100) == "b c"
    assert lesson_of("first line\n\nlast   line\n", 100) == "last line"
    assert lesson_of("Lesson: multiply before adding always", 20) == "multiply before..."
    assert lesson_of(" \n ", 100) is None


def test_batch_success_weights_by_hand():
    # one success in four: s = 1/4, a success weighs 3/4 and a failure 1/4, normalized to mean 1
    assert batch_success_weights([1.0, 0.0, 0.0, 0.0], 0.0) == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])
    # no success (s clipped to 1/B) or all successes (to 1 - 1/B): every row weighs 1
    assert batch_success_weights([0.0] * 4, 0.0) == pytest.approx([1.0] * 4)
    assert batch_success_weights([1.0] * 4, 0.0) == pytest.approx([1.0] * 4)
    # exponents: alpha = 2, beta = 0 with s = 1/2: raw 1/4 and 1, mean 5/8
    assert batch_success_weights([1.0, 0.0], 0.5, alpha=2.0, beta=0.0) == pytest.approx([0.4, 1.6])
    reflect = lambda prompts, model="policy": ["Lesson: x"] * len(prompts)  # noqa: E731
    source = ReflectionSource(args(batch_success_weights=True))
    context = source.context(view([0.0, 0.0, 0.0, 1.0], generate=reflect, offset=2), [0, 1])  # global rows 2, 3
    assert context.row_weights == pytest.approx([2 / 3, 2.0])
    assert context.fields["success"] == ["c3", "c3"]
    off = ReflectionSource(args(batch_success_weights=False))
    assert off.context(view([1.0, 1.0], generate=reflect), [0, 1]).row_weights is None


def view_of_task(rewards):
    """Rows of the embedded task (for the task's checker) with wrong completions."""
    rows = [{"prompt": "Q: 3+4*5-2=", "solution": "21"}] * len(rewards)
    texts = ["<think>4*5=20;3+20=24;24-2=22</think><answer>22</answer>"] * len(rewards)
    return RolloutView(rows, 2, 0, texts, list(rewards))


def test_the_task_checker_writes_the_first_wrong_step_and_its_lesson():
    source = ReflectionSource(args(context_generator="task-reflection"))
    context = source.context(view_of_task([0.0, 0.0]), [0, 1])
    assert context.fields["reflection"][0] == (
        "Step 2 wrote 3+20=24 where 3+20=23 is right. The answer is 21. Lesson: 3+20=23"
    )
    assert source.playbook.lessons == ["3+20=23"]  # the same lesson twice is kept once


# ------------------------------------------------------------------------------------------------ the loss
P_S = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
P_T = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)


def test_the_clipped_top_k_reverse_kl_by_hand():
    student, teacher = P_S.log().requires_grad_(), P_T.log().requires_grad_()
    # k = 2 + tail: the buckets are the student's top 2 tokens (0, 1) and the rest (token 2): the full distributions
    # here. Floor 0.5: q_T = max(p_T, 0.5 p_S) = (0.25, 0.6, 0.3), L = 0.5 ln 2 + 0.3 ln(1/2) + 0.2 ln(2/3)
    clipped = resd_topk_reverse_kl(student, teacher, k=2, floor=0.5)
    assert clipped.item() == pytest.approx(0.2 * math.log(4 / 3), rel=1e-12)
    unclipped = resd_topk_reverse_kl(student, teacher, k=2, floor=0.0)
    reverse_kl = 0.5 * math.log(5) + 0.3 * math.log(0.5) + 0.2 * math.log(2 / 3)
    assert unclipped.item() == pytest.approx(reverse_kl, rel=1e-12)
    # the paper's floor 0.2 does not bind here (0.2 p_S <= p_T): the reverse KL itself
    assert resd_topk_reverse_kl(student, teacher, k=2, floor=0.2).item() == pytest.approx(unclipped.item(), rel=1e-12)
    # no tail: both renormalized over tokens 0 and 1, (5/8, 3/8) and (1/7, 6/7)
    renormalized = resd_topk_reverse_kl(student, teacher, k=2, floor=0.0, tail=False)
    expected = 0.625 * math.log(0.625 * 7) + 0.375 * math.log(0.375 * 7 / 6)
    assert renormalized.item() == pytest.approx(expected, rel=1e-12)
    # the support is the student's top k, not the teacher's: k = 1 keeps token 0 (p_S 0.5) and the tail
    top1 = resd_topk_reverse_kl(student, teacher, k=1, floor=0.0)
    assert top1.item() == pytest.approx(0.5 * math.log(5) + 0.5 * math.log(0.5 / 0.9), rel=1e-12)
    clipped.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # the gradient treats the floor as a constant: d/dz of sum p_S (log p_S - c), c = log q_T fixed
    z = P_S.log().requires_grad_()
    log_s = z.log_softmax(-1)
    (log_s.exp() * (log_s - torch.tensor([0.25, 0.6, 0.3], dtype=torch.float64).log())).sum().backward()
    torch.testing.assert_close(student.grad, z.grad)


def test_the_registered_loss_and_its_knobs(tmp_path):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn((2, 3, 9), generator=generator), torch.randn((2, 3, 9), generator=generator)
    loss_fn = token_loss_fn("resd_topk", resd_topk=4, resd_teacher_floor=0.3, resd_tail=False)
    torch.testing.assert_close(loss_fn(student, teacher), resd_topk_reverse_kl(student, teacher, 4, 0.3, False))
    config = make_config(tmp_path, distill_loss="resd_topk")
    knobs = (config.resd_topk, config.resd_teacher_floor, config.resd_tail, config.distill_coef)
    assert knobs == (100, 0.2, True, 1.0)
    with pytest.raises(ValueError, match=r"resd_teacher_floor must lie in \[0, 1\], got 1.5"):
        make_config(tmp_path, distill_loss="resd_topk", resd_teacher_floor=1.5)
    with pytest.raises(ValueError, match=r"playbook_size must be an integer >= 1, got 0"):
        make_config(tmp_path, privileged_source="reflection", playbook_size=0)
    with pytest.raises(ValueError, match=r"reflection_instruction may name only .*, got \{answer\}"):
        make_config(tmp_path, privileged_source="reflection", reflection_instruction="{completion} {answer}")


@pytest.mark.parametrize(("name", "generator"), [("resd", "policy"), ("resd-scripted", "task-reflection")])
def test_the_methods(name, generator, tmp_path):
    config = trainer_args(DemoConfig(), name)  # the demo's budget: its answer template is replaced
    assert (config.credit, config.policy_loss_coef, config.distill_loss, config.distill_coef) == (
        "grpo", 0.0, "resd_topk", 1.0)  # fmt: skip
    assert (config.teacher, config.teacher_ema_decay, config.resd_teacher_floor, config.resd_tail) == (
        "ema", 0.9999, 0.2, True)  # fmt: skip
    assert (config.privileged_source, config.context_generator, config.batch_success_weights) == (
        "reflection", generator, True)  # fmt: skip
    # TRL's GRPOConfig refuses num_generations = 1 (the paper's one rollout per prompt): 16 prompts x 2 completions
    assert (config.num_generations, config.per_device_train_batch_size) == (2, 32)
    with pytest.raises(ValueError, match="at least 2 generations per prompt"):
        make_config(tmp_path, **{**CATALOGUE[name], "num_generations": 1, "per_device_train_batch_size": 4})
    generator_ = torch.Generator().manual_seed(0)
    student, teacher = torch.randn((3, 263), generator=generator_), torch.randn((3, 263), generator=generator_)
    loss_fn = Stages(config, row_subsets=True).plan(None).distill_fn
    torch.testing.assert_close(loss_fn(student, teacher), resd_topk_reverse_kl(student, teacher, 16, 0.2, True))


def test_the_scripted_methods_teacher_prompt_fits_the_tiny_model(tokenizer, tmp_path):
    dataset = task_dataset()
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=dataset, **CATALOGUE["resd-scripted"])
    trainer.source.playbook.curate(["3+20=23", "4*5=20"])
    wrong = "<think>1+1=3</think><answer>3</answer>"
    ids = torch.tensor([tokenizer(wrong)["input_ids"]] * 2)
    output = {"prompt_ids": None, "completion_ids": ids, "completion_mask": torch.ones_like(ids)}
    tap = RolloutTap(rewards=torch.tensor([0.0, 1.0]))  # the first completion failed, its sibling succeeded
    prompt_ids, mask, _, has_context = trainer.teacher_inputs([dataset[0]] * 2, output, "eval", rollout=tap)
    shown = [tokenizer.decode(row[keep.bool()]) for row, keep in zip(prompt_ids, mask, strict=True)]
    reflection = task_reflection(GenerationRequest("", dataset[0], wrong, 0.0, "reflection"))
    assert shown[0] == f"[- 3+20=23\n- 4*5=20|{reflection}|{wrong}] {dataset[0]['prompt']}"
    assert shown[1] == f"[- 3+20=23\n- 4*5=20|{NO_REFLECTION_TEXT}|{wrong}] {dataset[0]['prompt']}"
    assert has_context.all() and tap.row_weights.tolist() == [1.0, 1.0]  # s = 1/2: every row weighs 1
    assert trainer.source.playbook.lessons == ["3+20=23", "4*5=20"]  # an evaluation rollout does not curate
    assert mask.sum(1).max() + trainer.args.max_completion_length < 512  # within the tiny model's positions


# ------------------------------------------------------------------------------------------------ in a trainer
def zero_reward(completions, **kwargs):
    """No completion is ever rewarded."""
    return [0.0] * len(completions)


def task_dataset():
    return make_rl_dataset(TaskConfig(), 8, seed=0)


RESD = {**CATALOGUE["resd-scripted"], "teacher_ema_decay": 0.5}


def test_resd_trains_when_no_completion_is_rewarded(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=task_dataset(), **RESD)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert log["reward"] == 0.0 and log["rlsd/batch_success_rate"] == 0.0 and log["rlsd/reflection_count"] == 4.0
    assert log["rlsd/distill_loss"] > 0.0 and log["loss"] == pytest.approx(log["rlsd/distill_loss"], rel=1e-4)
    assert log["grad_norm"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.source.playbook.lessons and trainer.source.playbook.updates == 1


def test_a_rollout_carries_the_batch_success_weights_to_the_distillation_term(tokenizer, tmp_path):
    half = lambda completions, **kwargs: [float(i % 2) for i in range(len(completions))]  # noqa: E731
    trainer = build_trainer(tokenizer, tmp_path, reward=half, dataset=task_dataset(), **RESD)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([task_dataset()[i] for i in (0, 0, 1, 1)])
    # one success per group of 2: s = 1/2, every row weighs 1/2 before the normalization to mean 1
    torch.testing.assert_close(batch["rlsd_distill_weight"], torch.ones(4))
    skewed = lambda completions, **kwargs: [1.0] + [0.0] * (len(completions) - 1)  # noqa: E731
    trainer = build_trainer(tokenizer, tmp_path, reward=skewed, dataset=task_dataset(), **RESD)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([task_dataset()[i] for i in (0, 0, 1, 1)])
    torch.testing.assert_close(batch["rlsd_distill_weight"], torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))


def test_the_playbook_round_trips_through_the_checkpoint_files(tmp_path):
    source = ReflectionSource(args(context_generator="task-reflection"))
    source.playbook.curate(["multiply first", "carry the one"])
    assert rlsd_state_files(None, None, source) == [SOURCE_STATE_FILE]
    assert rlsd_state_files(None, None, AnswerSource(args())) == []  # a stateless source writes nothing
    save_rlsd_state(str(tmp_path), None, None, lambda m: m, write=True, source=source)
    assert sorted(os.listdir(tmp_path)) == [SOURCE_STATE_FILE]  # no temporary file left
    assert json.loads((tmp_path / SOURCE_STATE_FILE).read_text())["lessons"] == ["multiply first", "carry the one"]
    restored = ReflectionSource(args(context_generator="task-reflection"))
    load_rlsd_state(str(tmp_path), None, None, fresh=frozenset(), policy=None, unwrap=lambda m: m, source=restored)
    assert restored.state_dict() == source.state_dict()
    weights_only = ReflectionSource(args(context_generator="task-reflection"))
    load_rlsd_state(str(tmp_path), None, None, fresh=frozenset({SOURCE_STATE_FILE}), policy=None,
                    unwrap=lambda m: m, source=weights_only)  # fmt: skip
    assert weights_only.playbook.lessons == []  # a weights-only resume without the file starts it fresh
    smaller = ReflectionSource(args(context_generator="task-reflection", playbook_size=1))
    smaller.load_state_dict(source.state_dict())
    assert smaller.playbook.lessons == ["carry the one"]
    with pytest.raises(ValueError, match="not a list of strings"):
        smaller.load_state_dict({"lessons": "oops"})


SAVED = {**RESD, "playbook_size": 50, "max_steps": 2, "save_strategy": "steps", "save_steps": 1}


def test_the_playbook_is_sealed_in_the_checkpoint_and_restored_on_resume(tokenizer, tmp_path):
    straight = build_trainer(tokenizer, tmp_path / "a", reward=zero_reward, dataset=task_dataset(), **SAVED)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert SOURCE_STATE_FILE in manifest["files"]
    saved = json.loads((checkpoint / SOURCE_STATE_FILE).read_text())
    assert saved["updates"] == 1 and saved["lessons"]
    resumed = build_trainer(tokenizer, tmp_path / "b", reward=zero_reward, dataset=task_dataset(), **SAVED)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.source.state_dict() == straight.source.state_dict()
    assert resumed.source.playbook.updates == 2 and set(saved["lessons"]) <= set(resumed.source.playbook.lessons)
    pairs = zip(resumed.model.parameters(), straight.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    (checkpoint / SOURCE_STATE_FILE).unlink()
    again = build_trainer(tokenizer, tmp_path / "c", reward=zero_reward, dataset=task_dataset(), **SAVED)
    with pytest.raises(CheckpointError, match=r"rlsd_source_state\.json is missing"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_the_playbook_survives_kill_9_while_a_checkpoint_is_written(tokenizer, tmp_path):
    settings = {**SAVED, "max_steps": 4, "save_steps": 2}
    killed = tmp_path / "killed"
    result = run_killed_while_saving(
        tmp_path, killed, settings, module="test_resd", reward="zero_reward", dataset="task_dataset"
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (killed / f"{PARTIAL_PREFIX}checkpoint-4" / "checkpoint-4" / SOURCE_STATE_FILE).exists()
    assert json.loads((killed / "checkpoint-2" / SOURCE_STATE_FILE).read_text())["updates"] == 2

    resumed = build_trainer(tokenizer, killed, reward=zero_reward, dataset=task_dataset(), **settings)
    resumed.train(resume_from_checkpoint=True)  # the latest complete checkpoint: checkpoint-2
    straight = build_trainer(tokenizer, tmp_path / "straight", reward=zero_reward, dataset=task_dataset(), **settings)
    straight.train()
    assert resumed.state.global_step == straight.state.global_step == 4
    assert resumed.source.state_dict() == straight.source.state_dict()
    assert resumed.source.playbook.updates == 4
    pairs = zip(resumed.model.parameters(), straight.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert json.loads((killed / "checkpoint-4" / SOURCE_STATE_FILE).read_text()) == straight.source.state_dict()
    assert not list(killed.glob(PARTIAL_PREFIX + "*"))  # the torn write was replaced by the resumed run's
