"""`CreditAssembler` on its own: built from values and callables (a one-process accelerator), no trainer."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import make_config

from rlsd.core.rules import Signals, get_rule, rule_params
from rlsd.step.assign import CreditAssembler, rule_on_rows
from rlsd.step.batch import RLSDEntries


class OneProcess:
    """The collectives of a single process: gathering, reducing and padding change nothing."""

    process_index = 0
    is_main_process = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return tensor


def assembler(tmp_path, logged: list[tuple[str, dict[str, Any]]], **config: Any) -> CreditAssembler:
    """An assembler over a CPU config, logging into `logged`; groups of 3, a vocabulary of 10 tokens."""
    return CreditAssembler(
        accelerator=OneProcess(),
        args=make_config(tmp_path, **config),
        rule_state=None,
        log=lambda mode, metrics: logged.append((mode, metrics)),
        group_size=lambda: 3,
        decode_tokens=lambda column: [str(int(token)) for token in column.flatten()],
        vocab_size=10,
    )


def deferred_batch() -> tuple[RLSDEntries, dict[str, Any], torch.Tensor]:
    """Three rows of four tokens: A_i = 1 with Delta = (log 2, 0, log 1/2, pad); A_i = 0 with a NaN teacher (a row
    the teacher skipped); A_i = -1 without privileged context (its teacher is the student)."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    student = torch.full((3, 4), -1.0)
    delta = torch.tensor([[math.log(2.0), 0.0, math.log(0.5), 0.0], [0.0] * 4, [5.0] * 4])
    teacher = student + delta
    teacher[1] = float("nan")
    entries = RLSDEntries(
        has_context=torch.tensor([True, True, False]),
        seq_advantages=torch.tensor([1.0, 0.0, -1.0]),
        teacher_logps=teacher,
        scored=torch.tensor([True, False, True]),
        lam=torch.tensor(0.5, dtype=torch.float64),
    )
    return entries, {"completion_mask": mask, "completion_ids": torch.zeros(3, 4, dtype=torch.long)}, student


def test_rlsd_token_advantages_by_hand_without_a_trainer(tmp_path):
    logged: list[tuple[str, dict[str, Any]]] = []
    entries, batch, student = deferred_batch()
    adv = assembler(tmp_path, logged).assign(get_rule("rlsd"), entries, batch, student, "train")
    # lam = 0.5, eps_w = 0.2: w = 2 -> clip 1.2 -> A_it = 0.5 + 0.6; w = 1 -> 1; w = 1/2 -> clip 0.8 -> 0.5 + 0.4
    torch.testing.assert_close(adv[0], torch.tensor([1.1, 1.0, 0.9, 0.0]))
    assert torch.equal(adv[1], torch.zeros(4))  # A_i = 0: skipped, A_it = 0
    assert torch.equal(adv[2], torch.tensor([-1.0, -1.0, 0.0, 0.0]))  # no context: Delta = 0, A_it = A_i
    assert [mode for mode, _ in logged] == ["train"]
    metrics = logged[0][1]
    assert metrics["adv_mean"] == pytest.approx((1.1 + 1.0 + 0.9 - 1.0 - 1.0) / 5)  # the scored rows' tokens only
    assert metrics["nonfinite_count"] == 0.0  # the skipped row's NaN teacher is never read


def test_rule_on_rows_gives_zero_rows_and_metrics_over_the_scored_rows(tmp_path):
    entries, batch, student = deferred_batch()
    teacher = torch.where(entries.has_context.unsqueeze(1), entries.teacher_logps, student)
    signals = Signals(entries.seq_advantages, batch["completion_mask"], teacher, student)
    params = rule_params(make_config(tmp_path), lam=0.5)
    adv, metrics = rule_on_rows(get_rule("rlsd").fn, signals, params, entries.scored)
    assert torch.equal(adv[1], torch.zeros(4))
    scored = torch.tensor([0, 2])
    alone, alone_metrics = get_rule("rlsd").fn(
        Signals(entries.seq_advantages[scored], batch["completion_mask"][scored], teacher[scored], student[scored]),
        params,
    )
    assert torch.equal(adv[scored], alone) and metrics == alone_metrics
    _, everyone = get_rule("rlsd").fn(signals, params)  # every row: the NaN row would be counted
    assert everyone["nonfinite_count"] == 4.0 and metrics["nonfinite_count"] == 0.0


def test_teacher_rows_and_global_groups_on_one_process(tmp_path):
    logged: list[tuple[str, dict[str, Any]]] = []
    credit = assembler(tmp_path, logged, credit="uni-opd")
    assert credit.teacher_rows(torch.tensor([0.0, 1.0, 0.0, -2.0])).tolist() == [1, 3]
    entries, batch, student = deferred_batch()
    entries.scored = None
    entries.teacher_logps = torch.nan_to_num(entries.teacher_logps)
    rule = get_rule("uni-opd")
    adv = credit.assign(rule, entries, batch, student, "train")
    teacher = torch.where(entries.has_context.unsqueeze(1), entries.teacher_logps, student)
    signals = Signals(entries.seq_advantages, batch["completion_mask"], teacher, student,
                      group_ids=torch.zeros(3, dtype=torch.long), step_ids=torch.zeros(3, 4, dtype=torch.long),
                      vocab_size=10)  # fmt: skip
    expected, _ = rule.fn(signals, rule_params(credit.args, lam=0.5))
    torch.testing.assert_close(adv, expected.to(adv.dtype))
