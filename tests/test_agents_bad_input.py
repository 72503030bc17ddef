"""Bad input in multi-turn rollouts (issue 24): a teacher input over the model's context, a tool that raises, a tool
result no completion budget holds, an environment whose `reset` raises. Each is a clear error naming the rollout row
and the turn, where TRL would silently truncate, show the model an error it did not cause, drop the result, or raise
without saying which row."""

from __future__ import annotations

import pytest
from conftest import make_config, make_model
from datasets import Dataset
from test_agents import (
    ANSWERS,
    ENVIRONMENT,
    QUESTION,
    RESPONSE_TEMPLATE,
    TOOL_TEMPLATE,
    TURN_1,
    answer_reward,
    encode,
    fixed_rollout,
    lookup,
    render,
)

from rlsd.context.templates import render_teacher_prompt
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2

KEYS = ("a", "a", "b", "d")
"""The key each of the four rollout rows asks for."""


@pytest.fixture(scope="module")
def tool_tokenizer():
    """The tiny byte tokenizer with a chat template that renders tools, and TRL's parser of its tool calls."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template, tokenizer.response_template = TOOL_TEMPLATE, RESPONSE_TEMPLATE
    return tokenizer


def call_ids(tokenizer, name: str, arguments: str) -> list[int]:
    return encode(tokenizer, f'<call>{{"name": "{name}", "arguments": {arguments}}}</call><eos>')


def forced_tool_trainer(tokenizer, tmp_path, monkeypatch, tools, turns, **config):
    """An `RLSDTrainer` over `tools=` whose model turns are forced: `turns[k](i)` is turn k of the i-th row still
    calling tools (TRL's loop hands only those rows to the next turn; in these tests every row calls alike)."""
    from rlsd import RLSDTrainer

    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": "7"}] * 4)
    args = make_config(tmp_path, credit="rlsd", rlsd_lambda_decay_steps=0, **config)
    trainer = RLSDTrainer(make_model(tokenizer), answer_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, tools=tools)  # fmt: skip
    seen = []

    def forced_turn(prompt_ids, *args, **kwargs):
        seen.append(len(prompt_ids))
        return [turns[len(seen) - 1](row) for row in range(len(prompt_ids))], None

    monkeypatch.setattr(trainer, "_generate_single_turn", forced_turn)
    trainer.model.train()
    return trainer, dataset


def test_a_teacher_input_over_the_model_context_names_the_row_and_turn(tool_tokenizer, tmp_path):
    """The student's [prompt ; completion] fits the model's context, the teacher's (its prompt shows the answer) runs
    past it in the second model turn: refused, never scored at positions the model never had."""
    from rlsd import RLSDTrainer

    tokenizer = tool_tokenizer
    teacher_prompt = render(tokenizer, render_teacher_prompt(QUESTION, make_config(tmp_path).teacher_template,
                                                             answer="7"))  # fmt: skip
    first, gap = len(encode(tokenizer, TURN_1)), len(encode(tokenizer, ENVIRONMENT))
    completion = first + gap + len(encode(tokenizer, ANSWERS[0]))
    limit = len(teacher_prompt) + first + gap + 1  # the context ends after the first token of turn 1
    assert len(render(tokenizer, QUESTION)) + completion <= limit < len(teacher_prompt) + completion
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_positions=limit)  # fmt: skip
    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": "7"}] * 4)
    trainer = RLSDTrainer(model, answer_reward, args=make_config(tmp_path, credit="rlsd"), train_dataset=dataset,
                          processing_class=tokenizer, rollout_func=fixed_rollout(tokenizer))  # fmt: skip
    trainer.model.train()
    message = (
        rf"teacher's input of rollout row 0 is {len(teacher_prompt) + completion} tokens .* over the model's "
        rf"context of {limit} \(max_position_embeddings\) from completion token {first + gap + 1} \(turn 1\)"
    )
    with pytest.raises(ValueError, match=message):
        trainer._generate_and_score_completions([dict(row) for row in dataset])


def guarded_lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: the key to look up.
    """
    if key == "b":
        raise KeyError("the table has no row b")
    return "7"


def test_a_tool_that_raises_names_row_and_turn(tool_tokenizer, tmp_path, monkeypatch):
    """Row 2's second call raises inside the tool: TRL would show the model `{'error': ...}` and train on it."""
    tokenizer = tool_tokenizer
    turns = [
        lambda row: call_ids(tokenizer, "guarded_lookup", '{"key": "a"}'),
        lambda row: call_ids(tokenizer, "guarded_lookup", f'{{"key": "{KEYS[row]}"}}'),
        lambda row: encode(tokenizer, "7<eos>"),
    ]
    trainer, dataset = forced_tool_trainer(tokenizer, tmp_path, monkeypatch, [guarded_lookup], turns,
                                           max_completion_length=200)  # fmt: skip
    message = r"tool 'guarded_lookup' raised KeyError: 'the table has no row b' \(rollout row 2, turn 1, arguments"
    with pytest.raises(RuntimeError, match=message):
        trainer._generate_and_score_completions([dict(row) for row in dataset])


def test_a_call_whose_arguments_do_not_fit_the_tool_keeps_trl_s_error_result(tool_tokenizer, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """The model's own mistake (an argument the tool does not take) is what TRL's error result is for: the model
    reads it in the tool's turn, and the rollout goes on."""
    tokenizer = tool_tokenizer
    turns = [
        lambda row: call_ids(tokenizer, "guarded_lookup", '{"name": "a"}'),
        lambda row: encode(tokenizer, "7<eos>"),
    ]
    trainer, dataset = forced_tool_trainer(tokenizer, tmp_path, monkeypatch, [guarded_lookup], turns,
                                           max_completion_length=200)  # fmt: skip
    output = trainer._generate_and_score_completions([dict(row) for row in dataset])
    text = tokenizer.decode(output["completion_ids"][0][output["completion_mask"][0].bool()])
    assert "tool: {'error': \"guarded_lookup() got an unexpected keyword argument 'name'\"}" in text


def long_lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: the key to look up.
    """
    return "7" * 150 if key == "d" else "7"


def test_a_tool_result_over_the_budget_names_row_and_turn(tool_tokenizer, tmp_path, monkeypatch):
    """Row 3's result alone (150 characters) is longer than the 96-token completion budget: TRL would drop it and
    end the rollout at the call."""
    tokenizer = tool_tokenizer
    turns = [lambda row: call_ids(tokenizer, "long_lookup", f'{{"key": "{KEYS[row]}"}}'),
             lambda row: encode(tokenizer, "7<eos>")]  # fmt: skip
    trainer, dataset = forced_tool_trainer(tokenizer, tmp_path, monkeypatch, [long_lookup], turns,
                                           max_completion_length=96)  # fmt: skip
    length = len(encode(tokenizer, "tool: " + "7" * 150 + "assistant: "))  # TOOL_TEMPLATE strips the newlines
    message = (
        rf"result of tool 'long_lookup' \(rollout row 3, turn 0\) is {length} tokens, over max_completion_length=96"
    )
    with pytest.raises(ValueError, match=message):
        trainer._generate_and_score_completions([dict(row) for row in dataset])


def test_a_result_the_spent_budget_drops_is_counted_not_raised(tool_tokenizer, tmp_path, monkeypatch):
    """A result that fits the budget alone but not after the turns before it ends the rollout at the call, as a
    completion ends at the budget: logged as `rlsd/budget_dropped_tool_results`, the fraction of rows."""
    tokenizer = tool_tokenizer
    call = call_ids(tokenizer, "lookup", '{"key": "a"}')
    turns = [
        lambda row: call + (encode(tokenizer, " " * 50) if row == 1 else []),
        lambda row: encode(tokenizer, "7<eos>"),
    ]
    trainer, dataset = forced_tool_trainer(tokenizer, tmp_path, monkeypatch, [lookup], turns,
                                           max_completion_length=96)  # fmt: skip
    trainer._generate_and_score_completions([dict(row) for row in dataset])
    assert trainer._metrics["train"]["rlsd/budget_dropped_tool_results"] == [0.25]


class FaultyEnv:
    """A lookup environment whose `reset` fails on the rows whose solution is 9."""

    def reset(self, **kwargs):
        if kwargs["solution"] == "9":
            raise KeyError("no puzzle for solution 9")
        return " Observation: the key is a."

    def lookup(self, key: str) -> str:
        """Look a key up.

        Args:
            key: the key to look up.
        """
        return "7"


def test_an_environment_reset_that_raises_names_the_row(tool_tokenizer, tmp_path):
    from rlsd import RLSDTrainer

    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": s} for s in ("7", "7", "9", "7")])
    trainer = RLSDTrainer(make_model(tool_tokenizer), answer_reward, args=make_config(tmp_path, credit="rlsd"),
                          train_dataset=dataset, processing_class=tool_tokenizer,
                          environment_factory=FaultyEnv)  # fmt: skip
    trainer.model.train()
    message = r"FaultyEnv.reset raised KeyError: 'no puzzle for solution 9' \(rollout row 2, turn 0"
    with pytest.raises(RuntimeError, match=message):
        trainer._generate_and_score_completions([dict(row) for row in dataset])
