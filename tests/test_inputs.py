"""Bad input fails early with errors that name the thing; teacher prompts are built as documented."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_dataset, make_model, parity_reward
from datasets import Dataset

from rlsd import RLSDConfig, RLSDTrainer
from rlsd.context.templates import PAPER_TEACHER_TEMPLATE, render_teacher_prompt, render_teacher_prompts
from rlsd.step.scorer import Scorer
from rlsd.step.scoring import ScoreResult


def test_missing_privileged_column_names_it_and_lists_the_columns(tokenizer, tmp_path):
    dataset = make_dataset().rename_column("solution", "answer")
    with pytest.raises(ValueError, match=r"'solution'.*\['answer', 'prompt'\]"):
        RLSDTrainer(make_model(tokenizer), parity_reward, args=make_config(tmp_path), train_dataset=dataset)


def test_grpo_credit_does_not_need_the_privileged_column(tokenizer, tmp_path):
    dataset = make_dataset().remove_columns("solution")
    trainer = RLSDTrainer(
        make_model(tokenizer),
        parity_reward,
        args=make_config(tmp_path, credit="grpo"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.teacher is None


def test_unknown_template_field_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"\{hint\}"):
        make_config(tmp_path, teacher_template="{prompt} {hint} {answer}")


def test_template_without_answer_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\{answer\}"):
        make_config(tmp_path, teacher_template="{prompt}")


def test_empty_answer_names_the_row(tokenizer, tmp_path):
    rows = make_dataset().to_list()
    rows[3]["solution"] = "  "
    with pytest.raises(ValueError, match=r"1 row\(s\): 3"):
        RLSDTrainer(
            make_model(tokenizer), parity_reward, args=make_config(tmp_path), train_dataset=Dataset.from_list(rows)
        )


def test_empty_answer_in_a_rollout_batch_names_the_row():
    with pytest.raises(ValueError, match=r"batch row 1 \(prompt: 'Q: 2\+2='\)"):
        render_teacher_prompts(["Q: 1+1=", "Q: 2+2="], PAPER_TEACHER_TEMPLATE, {"answer": ["2", None]})


def test_empty_dataset_is_refused(tokenizer, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "solution": []})
    with pytest.raises(ValueError, match="train_dataset is empty"):
        RLSDTrainer(make_model(tokenizer), parity_reward, args=make_config(tmp_path), train_dataset=empty)


def test_unknown_credit_and_teacher_are_refused(tmp_path):
    with pytest.raises(ValueError, match="grpo, rlsd, opsd, grpo\\+opsd"):
        make_config(tmp_path, credit="ppo")
    with pytest.raises(ValueError, match="synced, live, initial, ema"):
        make_config(tmp_path, teacher="frozen")


def test_nan_teacher_logps_give_finite_advantages_and_are_counted(tokenizer, tmp_path, monkeypatch):
    trainer = RLSDTrainer(
        make_model(tokenizer),
        parity_reward,
        args=make_config(tmp_path, teacher="live"),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )
    real = Scorer.teacher_rows

    def corrupted(self, *args, **kwargs):
        scores = real(self, *args, **kwargs)
        logps = scores.logps.clone()
        logps[0, 0], logps[1, 1], logps[2, 2] = float("nan"), float("inf"), float("-inf")
        return ScoreResult(logps, scores.entropy)

    monkeypatch.setattr(Scorer, "teacher_rows", corrupted)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "rlsd/nonfinite_count" in e)
    assert entry["rlsd/nonfinite_count"] == 3
    assert torch.isfinite(torch.tensor(entry["loss"]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_paper_template_for_plain_and_conversational_prompts():
    plain = render_teacher_prompt("What is 2+3? Put the answer in \\boxed{}.", PAPER_TEACHER_TEMPLATE, answer=5)
    assert plain.startswith("What is 2+3? Put the answer in \\boxed{}.\n\nHere is a reference solution:\n5\n\n")
    assert plain.endswith("please try to solve this problem using your own approach below.")
    conversation = [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "What is 2+3?"},
    ]
    rewritten = render_teacher_prompt(conversation, "{prompt} [ref: {answer}]", answer="5")
    assert rewritten[:3] == conversation[:3]  # system and earlier turns kept
    assert rewritten[3] == {"role": "user", "content": "What is 2+3? [ref: 5]"}
    assert conversation[3]["content"] == "What is 2+3?"  # the row itself is not modified


def test_config_defaults_match_the_paper():
    config = RLSDConfig(output_dir="unused", report_to="none", use_cpu=True)
    assert (config.credit, config.rlsd_lambda, config.rlsd_lambda_decay_steps, config.rlsd_clip) == (
        "rlsd",
        0.5,
        50,
        0.2,
    )
    assert (config.teacher, config.teacher_sync_steps, config.privileged_column) == ("synced", 10, "solution")


def test_a_reward_that_raises_stops_training_naming_the_row(tokenizer, tmp_path):
    def fragile(completions, solution, **kwargs):
        return [1.0 / (int(answer) - 2) for answer in solution]  # an answer of 2 divides by zero

    trainer = RLSDTrainer(
        make_model(tokenizer),
        fragile,
        args=make_config(tmp_path, credit="grpo"),
        train_dataset=Dataset.from_list([{"prompt": "Q: 1+1=", "solution": "2"}] * 8),
        processing_class=tokenizer,
    )
    with pytest.raises(RuntimeError, match=r"'fragile' raised on row 0: ZeroDivisionError"):
        trainer.train()
