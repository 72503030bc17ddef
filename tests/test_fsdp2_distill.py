"""The distillation term under FSDP2 (two CPU processes, gloo): no hang when the ranks select different numbers of
tokens, and data-parallel gradients for the LM head (see tests/fsdp2_distill_worker.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlsd.core.distill import generalized_jsd, head_logits, selected_token_loss

pytestmark = pytest.mark.slow  # end-to-end runs

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_distillation_matches_data_parallel_gradients_with_uneven_tokens():
    """Ranks with 5 and 0, then 1 and 4 selected tokens (chunks of 2), untied and tied heads (and a live teacher
    sharing the untied head): the run ends (a collective out of step would time out) and every gradient equals the
    mean of the ranks' single-process ones."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "fsdp2_distill_worker.py"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the two FSDP2 processes hung: {error}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


@pytest.mark.parametrize("selected", [[True, False, True], [False, False, False]])
def test_selected_token_loss_is_unchanged_for_plain_heads(selected):
    """Without DTensors nothing is gathered: the loss is the direct one, and with no selected token an empty,
    differentiable result that gives the head no gradient."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 9), torch.nn.Linear(4, 9)
    hidden, teacher_hidden = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4)
    mask = torch.tensor([selected])
    per_token = selected_token_loss(generalized_jsd, hidden, teacher_hidden, mask, (student, teacher), 0.5, 2)
    expected = generalized_jsd(student(hidden[mask]) / 0.5, teacher(teacher_hidden[mask]) / 0.5)
    torch.testing.assert_close(per_token, expected)
    per_token.sum().backward()
    assert hidden.grad is not None
    assert (student.weight.grad is None) == (not any(selected))
    logits = head_logits(student, 0.5)
    assert logits.weight is student.weight and not logits.sharded


def test_a_live_teacher_sharing_the_student_head_gives_the_same_loss():
    """The teacher's logits then reuse the student's gathered head, detached: same values, no teacher gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 9)
    hidden, teacher_hidden = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    per_token = selected_token_loss(generalized_jsd, hidden, teacher_hidden, mask, (head, head), 1.0, 2)
    with torch.no_grad():
        teacher_logits = head(teacher_hidden[mask])
    torch.testing.assert_close(per_token, generalized_jsd(head(hidden[mask]), teacher_logits))
