"""Issue 26's error-localisation diagnostic (`rlsd bench localisation`) and the long-chain regime (`--task long`)."""

from __future__ import annotations

import json

import pytest

from rlsd.experiments.localisation import _pooled_auc, result_chars, within_auc
from rlsd.experiments.task import TASKS, Problem, TaskConfig, sample_problems, steps_teacher_prompt

PROBLEM = Problem(operands=(3, 4, 5, 2), operators=("+", "*", "-"))  # 4*5=20;3+20=23;23-2=21


def test_the_first_wrong_result_character_is_the_first_digit_that_departs_from_the_right_result():
    wrong = "<think>4*5=20;3+20=24;24-2=22</think><answer>22</answer>"
    chars = result_chars(wrong, PROBLEM)
    # results: "20" at 11-12, "24" at 19-20, "22" at 27-28; the first wrong is the "4" of "24" (the "2" is right)
    assert chars.offsets == [11, 12, 19, 20, 27, 28] and chars.first_wrong == 20
    assert wrong[20] == "4"
    negative = "<think>4*5=20;3+20=23;23-25=-2</think><answer>-2</answer>"  # wrong operands: "-2" against "21"
    chars = result_chars(negative, PROBLEM)
    assert chars.first_wrong == negative.index("=-2") + 1 and chars.offsets[-2:] == [28, 29]
    assert result_chars("<think>4*5=20;3+20=23;23-2=21</think><answer>7</answer>", PROBLEM) is None  # steps right
    assert result_chars("<think>ref=21;4*5=21;21+3=24</think>", PROBLEM).first_wrong == len("<think>ref=21;4*5=2")


def test_the_auc_counts_how_far_below_the_others_the_first_error_sits_ties_half():
    assert within_auc(-2.0, [0.0, -2.0, -3.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert _pooled_auc([-2.0, 0.0], [0.0, -3.0]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)


def test_the_long_regime_draws_8_to_12_operands_and_leaves_the_default_task_unchanged():
    counts = {len(p.operands) for p in sample_problems(TASKS["long"], 300, seed=0, split="train")}
    assert counts == set(range(8, 13))
    before = [p.prompt for p in sample_problems(TaskConfig(), 5, seed=0, split="train")]
    assert before == [p.prompt for p in sample_problems(TaskConfig(max_operands=0), 5, seed=0, split="train")]
    assert TaskConfig().key_dict() == {k: v for k, v in TaskConfig().to_dict().items() if k != "max_operands"}
    assert steps_teacher_prompt(PROBLEM) == "[ref 4*5=20;3+20=23;23-2=21] Q: 3+4*5-2="
    with pytest.raises(ValueError, match="max_operands must be 0 or >= num_operands 4, got 3"):
        TaskConfig(max_operands=3)


def test_the_bench_command_writes_the_auc_of_each_context(tmp_path, monkeypatch):
    import rlsd.experiments.localisation as localisation
    from rlsd.experiments.bench import main

    # every sample is the same wrong completion of its problem: its second step's result is off by one
    def wrong_completions(model, tokenizer, prompts, **kwargs):
        problems = {p.prompt: p for p in sample_problems(TaskConfig(num_operands=3), 400, seed=10_000, split="test")}
        problems.update(
            {p.prompt: p for p in sample_problems(TaskConfig(num_operands=3), 400, seed=20_000, split="test")}
        )
        out = []
        for prompt in prompts:
            steps = problems[prompt].steps
            left, value = steps[-1].rsplit("=", 1)
            out.append(f"<think>{';'.join([*steps[:-1], f'{left}={int(value) + 1}'])}</think><answer>0</answer>")
        return out

    monkeypatch.setattr(localisation, "generate", wrong_completions)
    assert main(["localisation", "--quick", "--problems", "6", "--samples", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "localisation.json").read_text())
    assert result["completions"] == 12 and result["provenance"]["command_line"].startswith("rlsd bench localisation")
    assert set(result["contexts"]) == {"answer", "steps"} and result["wrong_located"] > 0
    for row in result["contexts"].values():
        assert 0.0 <= row["auc_mean"] <= 1.0 and len(row["auc_per_completion"]) == result["wrong_located"]


def test_the_new_warm_start_fields_keep_the_earlier_cache_keys_and_show_the_worked_steps():
    import random

    from rlsd.experiments.warmstart import WarmStartConfig, _example

    assert WarmStartConfig().key() == "9ea8de807d233cec"  # the key of the default warm start before these fields
    assert WarmStartConfig(steps_share=0.5).key() != WarmStartConfig().key()
    assert WarmStartConfig(task=TASKS["long"]).key() != WarmStartConfig().key()
    shown, target = _example(PROBLEM, random.Random(0), WarmStartConfig(teacher_share=1.0, steps_share=1.0))
    assert shown == steps_teacher_prompt(PROBLEM) and target == PROBLEM.solution(
        cite_hint=target.startswith("<think>ref")
    )


def test_the_long_regime_and_the_bench_options_change_only_what_they_name():
    import argparse
    from pathlib import Path

    from rlsd.experiments.demo import DemoConfig
    from rlsd.experiments.regimes import LONG_COMPLETION_LENGTH, add_regime_options, apply_regime
    from rlsd.infra.validate import ConfigError

    parser = argparse.ArgumentParser()
    add_regime_options(parser)
    base = DemoConfig(out=Path("x"))
    assert apply_regime(base, parser.parse_args([])) == base
    args = ["--task", "long", "--prompts-per-step", "16", "--warm-seed", "1", "--eval-set", "pilot"]
    config = apply_regime(base, parser.parse_args(args))
    assert config.warm.task == TASKS["long"] and (config.warm.hint_share, config.warm.steps_share) == (0.0, 0.5)
    assert (
        config.warm.seed == 1
        and config.prompts_per_step == 16
        and config.max_completion_length == LONG_COMPLETION_LENGTH
    )
    assert (config.eval_set, config.eval_size, config.steps) == ("pilot", 200, base.steps)
    with pytest.raises(ConfigError, match="--prompts-per-step"):
        apply_regime(base, parser.parse_args(["--prompts-per-step", "0"]))
