"""The embedded task: determinism, disjoint splits, a verifier that never raises, tokenizer round trips."""

from __future__ import annotations

import math
import re

import pytest

from rlsd.experiments.task import (
    TaskConfig,
    accuracy_reward,
    leakage_rate,
    parse_answer,
    refers_to_hint,
    sample_problems,
    teacher_prompt,
)
from rlsd.experiments.tiny import build_char_tokenizer


def test_problem_format_and_left_to_right_chain():
    problem = sample_problems(TaskConfig(semantics="left-to-right"), 1, seed=0, split="train")[0]
    a = problem.operands[0]
    assert problem.prompt.startswith("Q: ") and problem.prompt.endswith("=")
    text = problem.solution()
    assert text.startswith("<think>") and text.endswith(f"<answer>{problem.answer}</answer>")
    assert len(problem.steps) == 3
    # Every step starts from the previous result.
    previous = a
    for step in problem.steps:
        assert step.startswith(str(previous))
        previous = int(step.rsplit("=", 1)[1])
    assert previous == problem.answer


def test_hand_written_problem():
    from rlsd.experiments.task import Problem

    problem = Problem(operands=(8, 8, 2, 1), operators=("*", "+", "-"))
    assert problem.prompt == "Q: 8*8+2-1="
    assert problem.solution() == "<think>8*8=64;64+2=66;66-1=65</think><answer>65</answer>"
    assert problem.solution(cite_hint=True) == "<think>ref=65;8*8=64;64+2=66;66-1=65</think><answer>65</answer>"
    assert teacher_prompt(problem) == "[ref 65] Q: 8*8+2-1="


def test_products_first_by_hand():
    from rlsd.experiments.task import Problem

    problem = Problem(operands=(3, 4, 5, 2), operators=("+", "*", "-"))
    assert problem.steps == ["4*5=20", "3+20=23", "23-2=21"] and problem.answer == 21
    assert Problem(operands=(3, 4, 5, 2), operators=("+", "*", "-"), semantics="left-to-right").answer == 33
    assert Problem(operands=(2, 3, 4, 5), operators=("*", "+", "*")).steps == ["2*3=6", "4*5=20", "6+20=26"]


def test_products_first_draws_single_products_with_multiplier_2_to_9():
    problems = sample_problems(TaskConfig(), 2000, seed=0, split="train")
    for problem in problems:
        ops, operands = problem.operators, problem.operands
        assert "**" not in "".join(ops), problem.prompt
        assert all(2 <= operands[i + 1] <= 9 for i, op in enumerate(ops) if op == "*"), problem.prompt
        assert problem.answer == _sum_of_products(problem.prompt[3:-1])
    assert sum("*" in p.operators for p in problems) > 500


def _sum_of_products(expression: str) -> int:
    """An independent oracle: split into signed terms at + and -, multiply each term's factors, add the terms."""
    total = 0
    for term in re.findall(r"[+-]?[^+-]+", expression):
        sign, factors = (-1, term[1:]) if term[0] == "-" else (1, term.lstrip("+"))
        total += sign * math.prod(int(f) for f in factors.split("*"))
    return total


def test_evaluation_sets_are_fixed_and_the_pilot_set_is_disjoint_from_the_heldout_set():
    from rlsd.experiments.task import HELDOUT_SIZE, evaluation_problems

    heldout = evaluation_problems(TaskConfig(), HELDOUT_SIZE)
    assert [p.prompt for p in evaluation_problems(TaskConfig(), 200)] == [p.prompt for p in heldout[:200]]
    pilot = evaluation_problems(TaskConfig(), 200, "pilot")
    assert len(pilot) == 200 and not {p.prompt for p in pilot} & {p.prompt for p in heldout}
    train = {p.prompt for p in sample_problems(TaskConfig(), 5000, seed=0, split="train")}
    assert not train & {p.prompt for p in heldout + pilot}
    with pytest.raises(ValueError, match="purpose"):
        evaluation_problems(TaskConfig(), 10, "final")


def test_generator_is_deterministic_and_seed_dependent():
    config = TaskConfig()
    first = [p.prompt for p in sample_problems(config, 100, seed=3, split="train")]
    assert first == [p.prompt for p in sample_problems(config, 100, seed=3, split="train")]
    assert first != [p.prompt for p in sample_problems(config, 100, seed=4, split="train")]
    assert len(set(first)) == 100


@pytest.mark.parametrize("config", [TaskConfig(), TaskConfig(num_operands=3, operand_digits=2, operators="+-")])
def test_splits_never_share_a_problem(config):
    train = {p.prompt for p in sample_problems(config, 3000, seed=0, split="train")}
    test = {p.prompt for p in sample_problems(config, 300, seed=0, split="test")}
    assert train and test and not train & test
    # A different seed draws other problems but never crosses the split either.
    assert not {p.prompt for p in sample_problems(config, 300, seed=9, split="test")} & train


def test_difficulty_knobs_are_respected():
    config = TaskConfig(num_operands=5, operand_digits=2, operators="+")
    for problem in sample_problems(config, 20, seed=0, split="train"):
        assert len(problem.operands) == 5 and set(problem.operators) == {"+"}
        assert all(10 <= value <= 99 for value in problem.operands)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>1+1=2</think><answer>2</answer>", 1.0),
        ("<think>1+1=2</think><answer> 2 </answer>", 1.0),
        ("<think>1+1=3</think><answer>3</answer>", 0.0),
        ("no tags at all 2", 0.0),
        ("<answer>2</answer><answer>2</answer>", 0.0),  # two answers
        ("<answer>two</answer>", 0.0),
        ("<answer>2.0</answer>", 0.0),
        ("<answer>" + "9" * 5000 + "</answer>", 0.0),  # huge number: no int() blow-up
        ("<answer>", 0.0),
        ("", 0.0),
    ],
)
def test_verifier_handles_malformed_completions(completion, expected):
    assert accuracy_reward([completion], ["2"]) == [expected]


def test_parse_answer_accepts_negative_numbers():
    assert parse_answer("<answer>-17</answer>") == -17


def test_verifier_reads_conversational_completions():
    assert accuracy_reward([[{"role": "assistant", "content": "<answer>5</answer>"}]], ["5"]) == [1.0]


@pytest.mark.parametrize(
    ("completion", "leaks"),
    [
        ("<think>ref=65;8*8=64</think><answer>65</answer>", True),
        ("<think>ref = 65;</think>", True),
        ("According to the reference solution the answer is 5", True),
        ("[ref 65] Q: 1+1=", True),
        ("<think>8*8=64;64+2=66;66-1=65</think><answer>65</answer>", False),
        ("<think>prefer 3*4=12</think>", False),  # 'ref' inside a word is no citation
        ("", False),
    ],
)
def test_leakage_detector(completion, leaks):
    assert refers_to_hint(completion) is leaks


def test_leakage_rate():
    assert leakage_rate(["ref=1;", "1+1=2", "1+1=2", "ref=3"]) == 0.5
    with pytest.raises(ValueError):
        leakage_rate([])


def test_tokenizer_round_trips_every_string_the_task_produces():
    tokenizer = build_char_tokenizer()
    config = TaskConfig(num_operands=4, operand_digits=2)
    for problem in sample_problems(config, 200, seed=1, split="train"):
        for text in (problem.prompt, teacher_prompt(problem), problem.solution(), problem.solution(cite_hint=True)):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    tags = tokenizer("<think></think><answer></answer>")["input_ids"]
    assert len(tags) == 4  # the four tags are single tokens


def test_bad_task_configs_are_refused():
    with pytest.raises(ValueError, match="operators"):
        TaskConfig(operators="/")
    with pytest.raises(ValueError, match="num_operands"):
        TaskConfig(num_operands=1)
    with pytest.raises(ValueError, match="semantics"):
        TaskConfig(semantics="right-to-left")
