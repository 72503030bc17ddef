"""Dataset adapters on fixture rows of every format, and the verifiable rewards."""

from __future__ import annotations

import time

import pytest
from datasets import Dataset

from rlsd.data.datasets import detect_format, load_rlsd_dataset, to_rlsd_rows
from rlsd.data.rewards import format_reward, integer_match, last_boxed, math_accuracy, resolve_reward

GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1,200 eggs twice.", "answer": "1,200 * 2 = 2,400\n#### 2,400"},
]
MATH = [
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "It is $\\boxed{\\frac{3}{4}}$."},
    {"problem": "Find x.", "solution": "First $\\boxed{1}$, then finally $x=\\boxed{\\sqrt{2}}$."},
]
MATH500 = [{"problem": "What is 2+2?", "solution": "So \\boxed{4}.", "answer": "4"}]
DAPO = [
    {
        "prompt": [
            {
                "role": "user",
                "content": "Solve the following math problem step by step. The last line of your response should be "
                "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
                'What is 6 times 7?\n\nRemember to put your answer on its own line after "Answer:".',
            }
        ],
        "reward_model": {"ground_truth": "42", "style": "rule-lm"},
    }
]
DEEPMATH = [{"question": "Evaluate the limit of 1/n.", "final_answer": "0", "difficulty": 3.0}]
GENERIC = [{"q": "What is 5 squared?", "a": "25"}]

CASES = [
    ("gsm8k", GSM8K, ["7", "2400"], "Tom has 3 apples"),
    ("math", MATH, ["\\frac{3}{4}", "\\sqrt{2}"], "Compute"),
    ("math", MATH500, ["4"], "What is 2+2?"),
    ("dapo_math", DAPO, ["42"], "What is 6 times 7?"),
    ("deepmath", DEEPMATH, ["0"], "Evaluate the limit"),
]


@pytest.mark.parametrize(("name", "rows", "answers", "question"), CASES)
def test_adapters_extract_the_hand_written_answers(name, rows, answers, question):
    dataset = Dataset.from_list(rows)
    assert detect_format(dataset.column_names) == name
    converted = to_rlsd_rows(dataset)
    assert converted["solution"] == answers
    prompt = converted[0]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[1]["content"].startswith(question) and "\\boxed{}" in prompt[1]["content"]
    if name == "dapo_math":
        assert "Remember to put" not in prompt[1]["content"]


def test_generic_adapter_uses_the_named_columns():
    converted = to_rlsd_rows(Dataset.from_list(GENERIC), prompt_column="q", answer_column="a", system_prompt=None)
    assert converted[0]["solution"] == "25"
    assert converted[0]["prompt"] == [
        {
            "role": "user",
            "content": "What is 5 squared?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_of_every_format_load_without_a_format_flag(tmp_path, suffix):
    path = tmp_path / f"gsm8k{suffix}"
    dataset = Dataset.from_list(GSM8K)
    {
        ".jsonl": dataset.to_json,
        ".json": lambda p: dataset.to_json(p, lines=False),
        ".parquet": dataset.to_parquet,
        ".csv": dataset.to_csv,
    }[suffix](str(path))
    converted = load_rlsd_dataset(str(path))
    assert converted["solution"] == ["7", "2400"]


def test_undetectable_columns_are_listed():
    with pytest.raises(ValueError, match=r"\['body', 'title'\]"):
        to_rlsd_rows(Dataset.from_list([{"title": "t", "body": "b"}]))


def test_unknown_format_and_missing_column_are_named():
    with pytest.raises(ValueError, match="unknown dataset format 'aime'"):
        to_rlsd_rows(Dataset.from_list(GSM8K), "aime")
    with pytest.raises(ValueError, match=r"needs column\(s\) \['problem', 'solution'\]"):
        to_rlsd_rows(Dataset.from_list(GSM8K), "math")


def test_row_without_answer_is_named():
    rows = [*GSM8K, {"question": "no answer here", "answer": "just text"}]
    with pytest.raises(ValueError, match="row 2 of the gsm8k dataset: has no final answer"):
        to_rlsd_rows(Dataset.from_list(rows))


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        to_rlsd_rows(Dataset.from_dict({"question": [], "answer": []}))


# ------------------------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("<think>1/2+1/4</think> The answer is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}", 1.0),
        ("<think>...</think> so \\boxed{0.75}", "\\frac{3}{4}", 1.0),
        ("<think>...</think> \\boxed{\\frac{2}{3}}", "\\frac{3}{4}", 0.0),
        ("<answer>42</answer>", "42", 1.0),
        ("I do not know.", "42", 0.0),
        ("\\boxed{", "42", 0.0),
    ],
)
def test_math_accuracy(completion, reference, expected):
    assert math_accuracy([completion], [reference]) == [expected]


def test_math_accuracy_counts_unparseable_completions():
    logged = {}
    math_accuracy(["no answer", "\\boxed{3}"], ["3", "3"], log_metric=lambda k, v: logged.__setitem__(k, v))
    assert logged == {"rewards/math_unparseable": 0.5}


@pytest.mark.parametrize(
    "completion",
    [
        "x" * 200_000 + " \\boxed{7}",  # very long
        "\\boxed{" + "\\frac{" * 300 + "1" + "}{2}" * 300 + "}",  # deeply nested LaTeX
        "$" + "(" * 5000 + "1" + ")" * 5000 + "$",
        "\\boxed{" + "x^{" * 200 + "2" + "}" * 200 + "}",
    ],
)
def test_math_accuracy_is_bounded_on_adversarial_input(completion):
    start = time.perf_counter()
    rewards = math_accuracy([completion], ["7"])
    assert time.perf_counter() - start < 12  # two parses and one compare, each bounded at 2 s, plus slack
    assert rewards in ([0.0], [1.0])
    if completion.startswith("x"):
        assert rewards == [1.0]  # the tail is read: the answer at the end is found


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("\\boxed{1,234}", 1.0),
        ("<answer>1234</answer>", 1.0),
        ("#### 1234", 1.0),
        ("\\boxed{1234.5}", 0.0),
        ("1234", 0.0),
    ],
)
def test_integer_match(completion, expected):
    assert integer_match([completion], ["1234"]) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think> so \\boxed{3}", 1.0),
        ("<think>a</think><answer>3</answer>", 1.0),
        ("<think>a</think> 3", 0.0),
        ("\\boxed{3}", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None


def boom(completions, solution, **kwargs):
    """A reward that fails on one row."""
    return [1.0 / (len(c) - 3) for c in completions]


def test_a_raising_reward_names_the_function_and_the_row():
    reward = resolve_reward("tests.test_data_rewards.boom")
    with pytest.raises(RuntimeError, match=r"'boom' raised on row 2: ZeroDivisionError"):
        reward(["abcdef", "abcde", "abc", "ab"], solution=["1"] * 4)


def test_unknown_reward_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="math_accuracy, integer_match, format"):
        resolve_reward("accuracy")
