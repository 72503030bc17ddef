"""SIGTERM, what a cluster sends before preemption: the run finishes its optimizer step, saves a sealed, resumable
checkpoint, exits with status 143 naming it, and resuming from it gives the model of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch
from conftest import build_trainer, run_child
from transformers import TrainerCallback, TrainerControl

from rlsd.infra.checkpoint import MANIFEST_FILE, PARTIAL_PREFIX
from rlsd.infra.preemption import PREEMPTED_EXIT_CODE, Preempted, SigtermStop, any_process

SETTINGS = dict(teacher="synced", teacher_sync_steps=2, rlsd_lambda_decay_steps=0, max_steps=4, save_strategy="no")
"""Four steps, the teacher synced at steps 2 and 4, no periodic checkpoint: the only one is SIGTERM's."""

SIGTERM_AT_STEP = """
class SigtermAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == {step}:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while optimizer step {step} runs


CALLBACKS.append(SigtermAt())
"""


class SendSigterm(TrainerCallback):
    """Sends this process `times` SIGTERMs at the start of optimizer step `step`, and records the handler then."""

    def __init__(self, step: int, times: int = 1) -> None:
        self.step, self.times, self.handler = step, times, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.handler = signal.getsignal(signal.SIGTERM)
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def sigterm_handler():
    """A recording SIGTERM handler installed for the test (the previous one restored after it)."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_saves_exits_143_and_resumes_to_the_same_model(tokenizer, tmp_path):
    out = tmp_path / "preempted"
    result = run_child(tmp_path, out, SETTINGS, SIGTERM_AT_STEP.format(step=3))
    assert result.returncode == PREEMPTED_EXIT_CODE == 143, result.stderr[-3000:]
    checkpoint = out / "checkpoint-3"
    line = (
        f"rlsd: stopped by SIGTERM after optimizer step 3; resumable checkpoint saved in {checkpoint} (resume with "
        f"--resume_from_checkpoint {checkpoint}, or true for the latest)"
    )
    assert line in result.stderr.splitlines(), result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", PARTIAL_PREFIX))) == [
        "checkpoint-3"
    ]
    assert json.loads((checkpoint / MANIFEST_FILE).read_text())["global_step"] == 3  # sealed, step 3 finished
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3

    resumed = build_trainer(tokenizer, out, **SETTINGS)
    resumed.train(resume_from_checkpoint=True)  # the latest checkpoint: SIGTERM's
    straight = build_trainer(tokenizer, tmp_path / "straight", **SETTINGS)
    straight.train()
    assert resumed.state.global_step == straight.state.global_step == 4
    assert resumed.teacher.last_sync_step == straight.teacher.last_sync_step == 4
    pairs = zip(resumed.model.parameters(), straight.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # bit-exact
    teachers = zip(resumed.teacher.model.parameters(), straight.teacher.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in teachers)


def test_the_handler_is_installed_while_training_and_restored_after(tokenizer, tmp_path, sigterm_handler):
    mine = signal.getsignal(signal.SIGTERM)
    trainer = build_trainer(tokenizer, tmp_path, max_steps=1)
    spy = SendSigterm(step=99)  # never sends; records nothing
    trainer.add_callback(spy)
    trainer.train()
    assert signal.getsignal(signal.SIGTERM) is mine and sigterm_handler == []

    with pytest.raises(Preempted) as stop:  # stopped at step 1 of 3, after its save
        trainer = build_trainer(tokenizer, tmp_path / "b", max_steps=3)
        sender = SendSigterm(step=1)
        trainer.add_callback(sender)
        trainer.train()
    assert stop.value.code == 143 and stop.value.step == 1 and trainer.state.global_step == 1
    assert stop.value.checkpoint == str(tmp_path / "b" / "checkpoint-1") and os.path.isdir(stop.value.checkpoint)
    assert sender.handler is not mine and signal.getsignal(signal.SIGTERM) is mine  # ours while training only
    assert sigterm_handler == []  # the run answered it, not the previous handler


def test_a_second_sigterm_goes_to_the_previous_handler_at_once(tokenizer, tmp_path, sigterm_handler):
    trainer = build_trainer(tokenizer, tmp_path, max_steps=3)
    trainer.add_callback(SendSigterm(step=2, times=2))
    with pytest.raises(Preempted):
        trainer.train()
    assert sigterm_handler == [signal.SIGTERM]  # the second one (the default handler would have killed the process)
    assert trainer.state.global_step == 2


def test_training_outside_the_main_thread_runs_without_a_handler(tokenizer, tmp_path, sigterm_handler):
    mine = signal.getsignal(signal.SIGTERM)
    trainer = build_trainer(tokenizer, tmp_path, max_steps=1)
    errors = []

    def train():
        try:
            trainer.train()
        except Exception as err:  # signal.signal raises ValueError outside the main thread
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert errors == [] and trainer.state.global_step == 1
    assert signal.getsignal(signal.SIGTERM) is mine


class TwoProcesses:
    """An accelerator of two processes whose other process's flag is `other` (the sum `reduce` computes)."""

    num_processes, device, is_main_process = 2, "cpu", True

    def __init__(self, other: float) -> None:
        self.other = other

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.other


def test_every_process_stops_at_the_step_any_of_them_got_sigterm():
    assert any_process(TwoProcesses(other=1.0))(False) is True  # the other process got it: this one saves too
    assert any_process(TwoProcesses(other=0.0))(False) is False
    assert any_process(TwoProcesses(other=0.0))(True) is True
    stop = SigtermStop(any_process(TwoProcesses(other=1.0)))
    control = stop.on_step_end(None, type("State", (), {"global_step": 7})(), TrainerControl())
    assert control.should_save and control.should_training_stop and stop.stop_step == 7
