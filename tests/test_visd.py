"""VISD (arXiv 2605.06094, reconstructed): the video task's scripted judge on hand-made completions, the judge source's
fields and metrics, the teacher prompt holding the judge's feedback, and VISD's credit, RLSD's direction-magnitude
rule with that teacher, computed by hand token by token."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_config

from rlsd import RLSDTrainer
from rlsd.context.generated import GenerationRequest
from rlsd.context.judge import JUDGE_KNOBS, JudgeSource, parse_feedback
from rlsd.context.prompts import RolloutTap
from rlsd.context.sources import RolloutView
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import Problem
from rlsd.experiments.tiny_vlm import build_tiny_qwen2_vl, build_vl_processor
from rlsd.experiments.video_judge import judge_clip, video_judge
from rlsd.experiments.video_task import QUESTION, clip_frames, clip_logps, video_rows

PROBLEM = Problem((3, 4, 5), ("+", "*"))  # 3+4*5: frames 3, +, 4, *, 5; steps 4*5=20, 3+20=23
RIGHT = "<think>4*5=20;3+20=23</think><answer>23</answer>"


# ---------------------------------------------------------------------------------------------- the scripted judge
@pytest.mark.parametrize(
    ("completion", "feedback"),
    [
        (RIGHT, "answer: ok; logic: ok; grounding: ok"),
        (
            "<think>4*6=24;3+24=27</think><answer>27</answer>",
            "answer: wrong; logic: step 1 should be 4*5=20; grounding: frame 5 shows 5, read as 6",
        ),
        (
            "<think>3+4=7;7*5=35</think><answer>35</answer>",  # operands from the frames, the wrong order: logic only
            "answer: wrong; logic: step 1 should be 4*5=20; grounding: ok",
        ),
        (
            "<think>4*5=20;3+20=24</think><answer>24</answer>",
            "answer: wrong; logic: step 2 should be 3+20=23; grounding: ok",
        ),
        (
            "<think>4*5=20</think><answer>20</answer>",
            "answer: wrong; logic: step 2 missing, should be 3+20=23; grounding: ok",
        ),
        ("<think>4*5=20;3+20=23</think>", "answer: missing; logic: ok; grounding: ok"),
        ("<answer>23</answer>", "answer: ok; logic: no steps; grounding: ok"),
    ],
    ids=["right", "misread-frame", "wrong-order", "arithmetic", "missing-step", "no-answer", "no-steps"],
)
def test_the_scripted_judge_names_the_wrong_step_and_frame(completion, feedback):
    assert judge_clip(PROBLEM, "3+4*5", completion) == feedback


def test_a_misread_operand_of_several_digits_names_its_frames():
    problem = Problem((12, 3), ("-",))
    feedback = judge_clip(problem, "12-3", "<think>17-3=14</think><answer>14</answer>")
    assert feedback == "answer: wrong; logic: step 1 should be 12-3=9; grounding: frames 1-2 show 12, read as 17"


def test_the_judge_reads_the_rows_frame_text_and_refuses_a_row_without_it():
    row = {"prompt": [{"role": "user", "content": QUESTION}], "solution": "23", "frame_text": "3+4*5"}
    assert video_judge(GenerationRequest(row["prompt"], row, RIGHT, 1.0)) == "answer: ok; logic: ok; grounding: ok"
    with pytest.raises(
        ValueError, match=r"column 'frame_text', which the row lacks \(it has \['prompt', 'solution'\]"
    ):
        video_judge(GenerationRequest("Q:", {"prompt": "Q:", "solution": "23"}, RIGHT, 1.0))


def test_feedback_parts_are_read_per_dimension():
    assert parse_feedback("answer: wrong; logic: step 2 should be 3+20=23; grounding: ok") == {
        "answer": "wrong", "logic": "step 2 should be 3+20=23", "grounding": "ok"}  # fmt: skip
    assert parse_feedback("Answer: ok\nnoise\nGROUNDING: frame 5\nanswer: wrong") == {
        "answer": "ok",
        "grounding": "frame 5",
    }


# ------------------------------------------------------------------------------------------------- the source
def source_args(**values):
    defaults = {key: knob.default for key, knob in JUDGE_KNOBS.items()}
    return SimpleNamespace(**{**defaults, "privileged_column": "solution", **values})


ROW = {"prompt": [{"role": "user", "content": QUESTION}], "solution": "23", "frame_text": "3+4*5"}
MISREAD = "<think>4*6=24;3+24=27</think><answer>27</answer>"


def test_the_source_fills_the_answer_and_each_rows_feedback_and_counts_the_flagged_dimensions():
    view = RolloutView([ROW, ROW], 2, 0, [RIGHT, MISREAD], [1.0, 0.0])
    context = JudgeSource(source_args(context_generator="video-judge")).context(view, [0, 1])
    assert context.fields == {"answer": ["23", "23"], "feedback": [
        "answer: ok; logic: ok; grounding: ok",
        "answer: wrong; logic: step 1 should be 4*5=20; grounding: frame 5 shows 5, read as 6"]}  # fmt: skip
    assert context.has_context == [True, True]
    metrics = context.metrics
    assert metrics["context_generator_calls"] == 2.0
    for dimension in ("answer", "logic", "grounding"):
        assert metrics[f"judge_{dimension}_flagged_frac"] == pytest.approx(0.5)


def test_the_judges_feedback_is_recorded_for_the_held_out_citation_metric():
    view = RolloutView([ROW, ROW], 2, 0, [RIGHT, MISREAD], [1.0, 0.0])
    source = JudgeSource(source_args(context_generator="video-judge"))
    source.remember(view, [0, 1], source.context(view, [0, 1]))
    assert [text for text, _ in source.record.texts()] == [
        "answer: ok; logic: ok; grounding: ok",
        "answer: wrong; logic: step 1 should be 4*5=20; grounding: frame 5 shows 5, read as 6"]  # fmt: skip


def test_a_model_judge_is_asked_with_the_verdict_the_reference_and_the_attempt():
    args = source_args(context_generator="policy", judge_instruction="{verdict}|{answer}|{prompt}|{completion}")
    asked = []

    def generate(prompts, model="policy"):
        asked.extend(prompts)
        return ["answer: wrong\nlogic: ok\ngrounding: ok", ""]

    view = RolloutView([ROW, ROW], 2, 0, [RIGHT, MISREAD], [1.0, 0.0], generate)
    context = JudgeSource(args).context(view, [0, 1])
    assert asked == [[{"role": "user", "content": f"correct|23|{QUESTION}|{RIGHT}"}],
                     [{"role": "user", "content": f"wrong|23|{QUESTION}|{MISREAD}"}]]  # fmt: skip
    assert context.has_context == [True, False]  # an empty feedback leaves the row without context, counted
    assert context.metrics["context_fallback_count"] == 1.0 and context.metrics["judge_answer_flagged_frac"] == 1.0


# ------------------------------------------------------------------------------------------------- the credit
def test_visd_weighs_tokens_by_rlsds_rule_on_a_hand_computed_case():
    """VISD's credit is RLSD's rule (the judge only changes the teacher): A_i's sign kept, lam = 0.5, clip 0.2."""
    from rlsd.core.rules import RuleParams, Signals, get_rule

    delta = torch.tensor([[0.1, 0.3, -0.05], [0.1, 0.3, -0.05]], dtype=torch.float64)
    student = torch.full_like(delta, -1.0)
    signals = Signals(seq_advantages=torch.tensor([2.0, -1.0], dtype=torch.float64), mask=torch.ones_like(delta),
                      teacher_logps=student + delta, student_logps=student)  # fmt: skip
    advantages, _ = get_rule(CATALOGUE["visd"]["credit"]).fn(signals, RuleParams(lam=0.5, clip=0.2))
    # A = 2: w = e^0.1, e^0.3 -> 1.2 (clipped), e^-0.05; A = -1: w = e^-0.1, e^-0.3 -> 0.8 (clipped), e^0.05
    expected = [[2 * (0.5 + 0.5 * 1.1051709), 2 * (0.5 + 0.5 * 1.2), 2 * (0.5 + 0.5 * 0.9512294)],
                [-(0.5 + 0.5 * 0.9048374), -(0.5 + 0.5 * 0.8), -(0.5 + 0.5 * 1.0512711)]]  # fmt: skip
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ in the trainer
def alternating_reward(completions, **kwargs):
    """1 on every other completion: each group holds a success and a failure."""
    return [float(index % 2) for index in range(len(completions))]


@pytest.fixture(scope="module")
def processor():
    return build_vl_processor(max_tokens_per_image=4)


def test_visd_credit_is_rlsds_rule_with_the_judges_feedback_in_the_teachers_prompt(processor, tmp_path):
    problems = [PROBLEM, Problem((2, 3, 1), ("*", "-"))]
    dataset = video_rows([clip_frames(p) for p in problems], problems, 8, "the test clips")
    config = make_config(tmp_path, max_completion_length=6, num_generations=2, rlsd_lambda=0.5,
                         rlsd_lambda_decay_steps=0, **CATALOGUE["visd"])  # fmt: skip
    trainer = RLSDTrainer(build_tiny_qwen2_vl(processor, seed=0), alternating_reward, args=config,
                          train_dataset=dataset, processing_class=processor)  # fmt: skip
    trainer.model.train()
    rows = [dataset[0], dataset[0], dataset[1], dataset[1]]
    batch = trainer._generate_and_score_completions(rows)  # the trainer's own rollout: the judge runs inside it
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["completion_ids"], batch["completion_mask"],
                                                           strict=True)]  # fmt: skip
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    feedback = [judge_clip(problems[i // 2], problems[i // 2].prompt[3:-1], text) for i, text in enumerate(texts)]
    # the teacher's prompt: the frames, then the answer and the judge's feedback on the row's own completion
    tap = RolloutTap(rewards=torch.tensor(alternating_reward(texts)))
    prompt_ids, prompt_mask, _, has_context = trainer.teacher_inputs(rows, batch, rollout=tap)
    assert has_context.all()
    for i, (prompt, mask) in enumerate(zip(prompt_ids, prompt_mask, strict=True)):
        shown = processor.tokenizer.decode(prompt[mask.bool()])
        assert shown.count("<|image_pad|>") == 5
        assert f"[ref {problems[i // 2].answer}|{feedback[i]}] {QUESTION}" in shown
    # the credit: A_it = A_i ((1 - lam) + lam clip(exp(sign(A_i) (tau_t - s_t)), 0.8, 1.2)), tau from a direct forward
    # of the teacher on [frames, `[ref 23|feedback] Q:`], s from the student on [frames, `Q:`]
    student = trainer.score_rollout("student", batch).logps
    advantages = trainer.token_advantages(batch, student)
    teacher, temperature = trainer.teacher.model, trainer.args.temperature
    seq = batch["rlsd_seq_advantages"].tolist()
    assert [math.copysign(1, a) for a in seq] == [-1, 1, -1, 1]
    changed = 0
    for i, completion in enumerate(ids):
        problem = problems[i // 2]
        frames = clip_frames(problem)
        with torch.no_grad():
            shown = f"[ref {problem.answer}|{feedback[i]}] {QUESTION}"
            tau = clip_logps(teacher, processor, frames, shown, completion, temperature)[0].tolist()
            plain = clip_logps(teacher, processor, frames, f"[ref {problem.answer}] {QUESTION}", completion,
                               temperature)[0].tolist()  # fmt: skip
            s = clip_logps(trainer.model, processor, frames, QUESTION, completion, temperature)[0].tolist()
        changed += max(abs(a - b) for a, b in zip(tau, plain, strict=True)) > 1e-4
        for t in range(len(completion)):
            weight = math.exp(math.copysign(1, seq[i]) * (tau[t] - s[t]))
            expected = seq[i] * (0.5 + 0.5 * min(max(weight, 0.8), 1.2))
            assert advantages[i, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), (i, t)
        assert (advantages[i, len(completion) :] == 0).all()
    assert changed == 4, "the feedback does not change the teacher: the test is vacuous"
