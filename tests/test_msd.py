"""MSD (Multilingual Self-Distillation, arXiv 2605.02971; method `msd`): the teacher is shown a parallel version of
the query *in place of* the student's (`privileged_source="parallel"`, a source that `replaces_prompt`), and the
distillation loss is the reverse KL(p_S || p_T) weighted per token by DPSW, sg((1 - H_K(p_T) / log K) *
(1 - p_S(y_t))) (`distill_loss="msd"`, a reconstruction of the published product); off-policy, the same on the
teacher's own samples (`teacher_rollout_loss="msd"`). Pinned: the teacher prompt (decoded from a tiny trainer's
`teacher_inputs`), the template check, both losses by hand, and one-step runs without reward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset
from datasets import Dataset

from rlsd.context.generated import GENERATED_KNOBS, GeneratedSource, GenerationRequest
from rlsd.context.parallel import PARALLEL_KNOBS, ParallelSource
from rlsd.context.sources import Context, RolloutView, privileged_source, validate_teacher_template
from rlsd.context.templates import render_teacher_prompts
from rlsd.core.distill import SampledTokenLoss, chunked_token_loss, token_loss_fn
from rlsd.core.family_losses import dpsw_weights, msd_token_loss, msd_topk_token_loss, topk_confidence
from rlsd.experiments.contexts import number_words, task_words
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import Problem
from rlsd.infra.validate import ConfigError


def zero_reward(completions, **kwargs):
    """No completion is ever rewarded: every GRPO advantage is 0."""
    return [0.0] * len(completions)


def decoded_teacher_prompts(trainer, rows):
    """The teacher prompts of `rows` as the trainer tokenizes them, decoded without padding."""
    ids, mask, _, has_context = trainer.teacher_inputs(rows, {"prompt_ids": None}, "train")
    assert has_context.all()
    return [trainer.processing_class.decode(row[keep.bool()]) for row, keep in zip(ids, mask, strict=True)]


# ------------------------------------------------------------------------------------------- the teacher prompt
def test_the_task_words_generator_writes_the_problem_in_words_and_keeps_its_frame():
    problem = Problem((3, 4, 5, 2), ("+", "*", "-"))
    assert problem.prompt == "Q: 3+4*5-2="
    assert task_words(GenerationRequest("", {"prompt": problem.prompt})) == "Q: three plus four times five minus two="
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 13+0*111= Use <answer>."}]
    assert (
        task_words(GenerationRequest("", {"prompt": chat}))
        == "Q: thirteen plus zero times one hundred eleven= Use <answer>."
    )
    assert [number_words(n) for n in (0, 21, 90, 305, 1_234_000)] == [
        "zero", "twenty-one", "ninety", "three hundred five", "one million two hundred thirty-four thousand"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no arithmetic expression"):
        task_words(GenerationRequest("", {"prompt": "What is six?"}))


def test_the_teacher_prompt_is_the_parallel_prompt_with_no_trace_of_the_students(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, **CATALOGUE["msd"])
    assert trainer.args.teacher_template == "{parallel}"
    rows = [make_dataset()[i] for i in (0, 0, 1, 5)]  # a group shares its prompt: written once
    decoded = decoded_teacher_prompts(trainer, rows)
    assert decoded == [
        "Q: one plus zero times one=",
        "Q: one plus zero times one=",
        "Q: two plus seven times eleven=",
        "Q: six plus nine times one hundred eleven=",
    ]
    for row, text in zip(rows, decoded, strict=True):
        assert row["prompt"] not in text and not any(ch.isdigit() for ch in text)
    metrics = trainer._metrics["train"]
    assert metrics["rlsd/context_generator_calls"] == [3.0]  # three distinct prompts among the four rows
    assert (metrics["rlsd/parallel_generated"], metrics["rlsd/parallel_from_column"]) == ([4.0], [0.0])


def test_a_parallel_column_is_used_where_a_row_has_one_and_the_rest_is_generated(tokenizer, tmp_path):
    rows = [{**make_dataset()[i], "parallel_prompt": text} for i, text in ((0, "Q: un plus zero fois un="), (1, ""))]
    dataset = Dataset.from_list(rows)
    trainer = build_trainer(tokenizer, tmp_path, dataset=dataset, **CATALOGUE["msd"])
    assert decoded_teacher_prompts(trainer, list(dataset)) == [
        "Q: un plus zero fois un=",
        "Q: two plus seven times eleven=",
    ]
    metrics = trainer._metrics["train"]
    assert (metrics["rlsd/parallel_from_column"], metrics["rlsd/parallel_generated"]) == ([1.0], [1.0])
    bad = Dataset.from_list([{**rows[0], "parallel_prompt": ["a list"]}])
    with pytest.raises(ValueError, match=r"train_dataset column 'parallel_prompt' \(parallel_column\) holds a "
                                         r"non-string in 1 row\(s\): 0"):  # fmt: skip
        build_trainer(tokenizer, tmp_path, dataset=bad, **CATALOGUE["msd"])


def test_a_conversation_keeps_its_system_turn_and_a_model_generator_is_asked_to_translate():
    seen = []

    def view_generate(prompts, model="policy"):
        seen.append((prompts, model))
        return ["Q: one plus two=" for _ in prompts]

    args = type("Args", (), {**{k: knob.default for k, knob in PARALLEL_KNOBS.items()}, "parallel_language": "Words"})
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 1+2="}]
    view = RolloutView([{"prompt": chat}] * 2, 2, generate=view_generate)
    context = ParallelSource(args()).context(view, [0, 1])
    ((asked, model),) = seen
    assert model == "policy" and asked == [[{"role": "user", "content": PARALLEL_KNOBS["parallel_instruction"].default
                                             .format(language="Words", prompt="Q: 1+2=")}]]  # fmt: skip
    (teacher,) = set(map(repr, render_teacher_prompts([chat, chat], "{parallel}", context.fields)))
    assert teacher == repr(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: one plus two="}]
    )


# -------------------------------------------------------------------------------------------- the template check
def test_a_replacing_source_may_omit_prompt_and_any_other_source_still_may_not(tmp_path, registries):
    validate_teacher_template("{parallel}", "parallel")
    validate_teacher_template("In words: {parallel} (was: {prompt})", "parallel")  # {prompt} stays allowed
    with pytest.raises(ValueError, match=r"^teacher_template must contain \{parallel\}; got '\{prompt\}'$"):
        validate_teacher_template("{prompt}", "parallel")
    with pytest.raises(ValueError, match=r"^teacher_template uses \{answer\}, which privileged_source='parallel' does "
                                         r"not fill \(it fills \{prompt\}, \{parallel\}\)$"):  # fmt: skip
        validate_teacher_template("{parallel} {answer}", "parallel")
    # every other source, built-in or registered, still needs {prompt}, with the same message as before
    with pytest.raises(ValueError, match=r"^teacher_template must contain \{prompt\}; got '\[ref \{answer\}\]'$"):
        validate_teacher_template("[ref {answer}]", "answer")

    def note_source(source_name, replaces):
        @privileged_source
        class NoteSource(GeneratedSource):
            name, fills, default_template, replaces_prompt = source_name, ("note",), "{note}", replaces

            def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
                return Context({"note": ["n"] * len(rows)}, [True] * len(rows))

    note_source("test-replacing", True)
    validate_teacher_template("{note}", "test-replacing")
    assert make_config(tmp_path, privileged_source="test-replacing").teacher_template == "{note}"
    note_source("test-keeping", False)  # the same source, not replacing: its default template is refused
    with pytest.raises(ValueError, match=r"^teacher_template must contain \{prompt\}; got '\{note\}'$"):
        make_config(tmp_path, privileged_source="test-keeping")
    assert make_config(tmp_path, privileged_source="parallel").teacher_template == "{parallel}"


def test_the_parallel_knobs_are_config_fields_with_their_checks(tmp_path):
    config = make_config(tmp_path, privileged_source="parallel")
    assert (config.parallel_column, config.parallel_language, config.msd_topk) == ("parallel_prompt", "English", 20)
    assert set(GENERATED_KNOBS) <= set(PARALLEL_KNOBS)
    for key, value, message in (
        ("parallel_instruction", "Translate it.", r"^parallel_instruction must contain \{prompt\}"),
        ("parallel_instruction", "{prompt} in {lang}", r"^parallel_instruction may name only \{prompt\} and "
                                                       r"\{language\}, got \{lang\}"),
        ("parallel_instruction", "{prompt", r"^parallel_instruction must be a valid format string"),
        ("parallel_language", " ", r"^parallel_language must name a language"),
        ("msd_topk", 0, r"^msd_topk must be an integer >= 1, got 0"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_config(tmp_path, privileged_source="parallel", **{key: value})


# ------------------------------------------------------------------------------------------------ the loss by hand
LN2, LN3 = math.log(2.0), math.log(3.0)


def test_dpsw_weights_and_the_weighted_reverse_kl_by_hand():
    # token 0: p_S = (1/2, 1/4, 1/4), p_T = (1/4, 1/2, 1/4), y = 0; token 1: the teacher's top 2 tie, y = 2
    p_s = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64)
    p_t = torch.tensor([[0.25, 0.5, 0.25], [0.4, 0.4, 0.2]], dtype=torch.float64)
    ids = torch.tensor([0, 2])
    student = p_s.log().requires_grad_()
    teacher = p_t.log().requires_grad_()  # a teacher that asked for gradient gets none
    # teacher top-2 of token 0 renormalized: (2/3, 1/3), H = ln 3 - 2/3 ln 2, w^T = 1 - H / ln 2 = 5/3 - log2(3)
    w_t = 5.0 / 3.0 - LN3 / LN2
    torch.testing.assert_close(
        topk_confidence(teacher.log_softmax(-1), 2), torch.tensor([w_t, 0.0], dtype=torch.float64)
    )
    # w^S = 1 - p_S(y): 1/2 and 1/2
    weights = dpsw_weights(student.log_softmax(-1), teacher.log_softmax(-1), ids, 2)
    torch.testing.assert_close(weights, torch.tensor([w_t * 0.5, 0.0], dtype=torch.float64))
    # KL(p_S || p_T) of token 0 = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2
    per_token = msd_token_loss(student, teacher, ids, k=2)
    torch.testing.assert_close(per_token, torch.tensor([w_t * 0.5 * 0.25 * LN2, 0.0], dtype=torch.float64))
    per_token.sum().backward()
    # the weight is a constant: dL/dz_S = w * p_S * (log p_S - log p_T - KL); none through w or into the teacher
    expected = w_t * 0.5 * p_s[0] * (p_s[0].log() - p_t[0].log() - 0.25 * LN2)
    torch.testing.assert_close(student.grad[0], expected)
    torch.testing.assert_close(student.grad[1], torch.zeros(3, dtype=torch.float64))
    assert teacher.grad is None
    # K = 1: the teacher's factor is 1; K is capped at the vocabulary
    assert topk_confidence(p_t.log(), 1).tolist() == [1.0, 1.0]
    torch.testing.assert_close(topk_confidence(p_t.log(), 50), topk_confidence(p_t.log(), 3))


def test_the_registered_loss_reads_the_sampled_tokens_through_the_chunked_kernel():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn((2, 3, 7), generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn((2, 3, 7), generator=generator, dtype=torch.float64)
    ids = torch.tensor([[0, 6, 2], [3, 3, 5]])
    loss_fn = token_loss_fn("msd", msd_topk=4)
    assert isinstance(loss_fn, SampledTokenLoss)
    expected = msd_token_loss(student, teacher, ids, k=4)
    identity = lambda hidden: hidden  # noqa: E731
    chunked = chunked_token_loss(loss_fn, student, teacher, identity, identity, chunk_tokens=4, sampled_ids=ids)
    torch.testing.assert_close(chunked, expected)
    assert (expected > 0).all()
    with pytest.raises(ValueError, match="reads the sampled tokens"):
        loss_fn(student, teacher)


# ------------------------------------------------------------------------------------------------ in a trainer
def test_msd_trains_when_no_completion_is_rewarded(tokenizer, tmp_path):
    assert CATALOGUE["msd"] == {"credit": "grpo", "policy_loss_coef": 0.0, "teacher": "initial", "distill_loss": "msd",
                                "privileged_source": "parallel", "context_generator": "task-words",
                                "teacher_template": "{parallel}"}  # fmt: skip
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, **CATALOGUE["msd"])
    assert trainer.args.distill_coef == 1.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert log["reward"] == 0.0 and log["reward_std"] == 0.0
    assert log["rlsd/distill_loss"] > 0.0 and log["loss"] == pytest.approx(log["rlsd/distill_loss"], rel=1e-3)
    assert log["rlsd/parallel_generated"] > 0 and log["grad_norm"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------ off-policy
def test_the_off_policy_loss_on_the_teachers_top_k_by_hand():
    # the teacher's top 2 of p_T = (1/2, 3/10, 1/5) and the tail 1/5; the student p_S = (1/5, 3/10, 1/2); y = 0
    p_s = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    student = p_s.log().requires_grad_()
    top_logps = torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()
    top_ids, ids = torch.tensor([[0, 1]]), torch.tensor([0])
    per_token = msd_topk_token_loss(student, top_logps, top_ids, ids)
    # buckets s = (1/5, 3/10, 1/2), q = (1/2, 3/10, 1/5): KL = 1/5 ln(2/5) + 0 + 1/2 ln(5/2) = 3/10 ln(5/2)
    # w^T: the top 2 renormalized (5/8, 3/8); w^S = 1 - 1/5
    entropy = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    expected = (1.0 - entropy / LN2) * 0.8 * 0.3 * math.log(2.5)
    torch.testing.assert_close(per_token, torch.tensor([expected], dtype=torch.float64))
    per_token.sum().backward()
    assert student.grad.abs().sum() > 0
    # with all V tokens kept it is the on-policy loss (the tail bucket holds nothing)
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn((2, 2, 5), generator=generator, dtype=torch.float64).unbind(0)
    top = teacher.log_softmax(-1).topk(5, dim=-1)
    sampled = torch.tensor([1, 4])
    torch.testing.assert_close(msd_topk_token_loss(student, top.values, top.indices, sampled),
                               msd_token_loss(student, teacher, sampled, k=5), rtol=1e-5, atol=1e-6)  # fmt: skip


OFF_POLICY = {**CATALOGUE["msd"], "distill_loss": "none", "teacher_rollout_loss": "msd", "teacher_rollouts": 2}


def test_off_policy_msd_trains_on_the_teachers_samples_when_no_completion_is_rewarded(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, **OFF_POLICY)
    assert trainer.args.teacher_rollout_coef == 1.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/teacher_rollout_loss" in entry]
    assert log["reward"] == 0.0 and log["rlsd/teacher_rollout_loss"] > 0.0
    assert log["loss"] == pytest.approx(log["rlsd/teacher_rollout_loss"], rel=1e-3) and log["grad_norm"] > 0.0
    assert log["rlsd/parallel_generated"] > 0  # the teacher sampled from the parallel prompts
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"--teacher_rollouts.*is 5 with teacher_rollout_loss='msd' and "
                                          r"num_generations=4"):  # fmt: skip
        make_config(tmp_path, **{**OFF_POLICY, "teacher_rollouts": 5})
