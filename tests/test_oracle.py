"""The positive control of issue 26 (`rlsd.experiments.oracle`): oracle token credit from the task's checker, by hand
and in a trainer, where the annotation source's token labels reach the credit rule (`Signals.token_labels`)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, parity_reward

from rlsd.context.generated import context_generator
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.oracle import oracle_advantages, register
from rlsd.experiments.task import TaskConfig, make_rl_dataset

F64 = torch.float64


def test_the_oracle_leaves_a_wrong_completions_correct_prefix_unblamed_by_hand():
    seq = torch.tensor([1.0, -0.5, -1.0], dtype=F64)
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 0, -1, -1, -1], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    adv, metrics = oracle_advantages(seq, labels, mask, lam=1.0)
    expected = [[1.0] * 5, [0.0, 0.0, -0.5, -0.5, 0.0], [-1.0, -1.0, -1.0, 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64))
    # blamed: 2 of row 1's 4 tokens, all 3 of row 2's (no error span located: it keeps A_i, counted)
    assert metrics["oracle_blamed_frac"] == pytest.approx(5 / 7) and metrics["oracle_unlabelled_count"] == 1.0
    half, _ = oracle_advantages(seq, labels, mask, lam=0.5)  # the prefix keeps (1 - lam) of the blame
    torch.testing.assert_close(half[1], torch.tensor([-0.25, -0.25, -0.5, -0.5, 0.0], dtype=F64))
    zero, _ = oracle_advantages(seq, labels, mask, lam=0.0)  # lam = 0: GRPO
    torch.testing.assert_close(zero, seq.unsqueeze(1) * mask.double())


def test_the_annotation_sources_error_labels_reach_the_oracle_rule_in_a_trainer(tokenizer, tmp_path, registries):
    register()
    # the second half of every completion is its "error span": the rule must see labels, blaming part of each row
    context_generator("test-second-half")(
        lambda request: "arithmetic error\n" + request.completion[len(request.completion) // 2 :]
    )
    dataset = make_rl_dataset(TaskConfig(), 8, seed=0)
    setup = {
        **CATALOGUE["oracle"],
        "context_generator": "test-second-half",
        "teacher": "live",
        "max_completion_length": 12,
    }
    trainer = build_trainer(tokenizer, tmp_path, reward=parity_reward, dataset=dataset, **setup)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dataset[i] for i in (0, 0, 0, 0)])
    labels, mask = batch["rlsd_token_labels"], batch["completion_mask"].bool()
    assert (labels[~mask] == 0).all() and (labels[mask] == -1).any()
    trainer = build_trainer(tokenizer, tmp_path, reward=parity_reward, dataset=dataset, **setup)
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/oracle_blamed_frac" in entry]
    assert 0.0 < log["rlsd/oracle_blamed_frac"] < 1.0 and log["rlsd/oracle_unlabelled_count"] == 0.0


def test_the_oracle_without_token_labels_is_refused(tokenizer, tmp_path, registries):
    register()
    dataset = make_rl_dataset(TaskConfig(), 8, seed=0)
    setup = {
        **CATALOGUE["oracle"],
        "privileged_source": "answer",
        "teacher_template": "[ref {answer}] {prompt}",
        "teacher": "live",
    }
    setup.pop("context_generator")
    trainer = build_trainer(tokenizer, tmp_path, reward=parity_reward, dataset=dataset, **setup)
    with pytest.raises(ValueError, match="credit='oracle' reads the checker's token labels"):
        trainer.train()
