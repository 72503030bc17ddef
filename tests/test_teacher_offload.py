"""Teacher offload (`teacher_offload`): the teacher's own weights wait off the accelerator and are moved to it for
each use. On a CPU the move is a no-op, so the moves are recorded through the hook (`move_weights`) against a fake
accelerator device, and every teacher forward is checked to run while the teacher is "on" it."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import build_trainer
from torch import nn

from rlsd.infra.validate import ConfigError
from rlsd.teachers import offload as offload_module
from rlsd.teachers.offload import OFFLOAD_DEVICE, TeacherOffload, offload_teachers, resident

FAKE_ACCELERATOR = torch.device("cuda", 0)  # never used for a tensor: the recording hook does not move anything


class Mover:
    """`move_weights` replaced: records where each teacher was sent, moves nothing."""

    def __init__(self) -> None:
        self.moves: list[str] = []
        self.where: dict[int, str] = {}

    def __call__(self, teacher, device: torch.device) -> None:
        self.moves.append(device.type)
        self.where[id(teacher.model)] = device.type


def test_a_use_moves_the_teacher_on_once_and_off_after_even_on_an_error(monkeypatch):
    mover = Mover()
    monkeypatch.setattr(offload_module, "move_weights", mover)
    teacher = types.SimpleNamespace(model=nn.Linear(2, 2), shadow=None)
    teacher.offload = TeacherOffload(device=FAKE_ACCELERATOR)
    with resident(teacher), resident(teacher):  # nested uses (a sync inside a pass) move once
        assert mover.where[id(teacher.model)] == "cuda"
    with pytest.raises(RuntimeError), resident(teacher):
        raise RuntimeError("a failed pass")
    assert mover.moves == ["cuda", "cpu", "cuda", "cpu"]
    assert (teacher.offload.onloads, teacher.offload.offloads) == (2, 2)
    assert mover.where[id(teacher.model)] == OFFLOAD_DEVICE.type


def test_move_weights_moves_the_ema_shadow_with_the_model():
    teacher = types.SimpleNamespace(model=nn.Linear(2, 2), shadow=[torch.zeros(2), None])
    offload_module.move_weights(teacher, OFFLOAD_DEVICE)
    assert teacher.shadow[0].device == OFFLOAD_DEVICE and teacher.shadow[1] is None


def test_no_teacher_with_weights_or_a_sharded_run_is_refused_by_name():
    live = types.SimpleNamespace(model=None, mode="live")
    with pytest.raises(ConfigError, match=r"--teacher_offload.*no teacher of this run keeps weights"):
        offload_teachers([live, None], "NO")
    copy = types.SimpleNamespace(model=nn.Linear(2, 2), mode="synced")
    with pytest.raises(ConfigError, match=r"--teacher_offload.*DEEPSPEED"):
        offload_teachers([copy], "DEEPSPEED")


def run(tokenizer, tmp_path, **config):
    """A trained 2-step RLSD run with an EMA teacher (each step: one teacher pass, one EMA update)."""
    trainer = build_trainer(tokenizer, tmp_path, max_steps=2, credit="rlsd", teacher="ema", **config)
    trainer.train()
    return trainer


def test_every_teacher_use_runs_on_the_accelerator_the_teacher_waits_off_it_and_results_are_unchanged(
    tokenizer, tmp_path, monkeypatch
):
    mover = Mover()
    monkeypatch.setattr(offload_module, "move_weights", mover)
    trainer = build_trainer(tokenizer, tmp_path / "offload", max_steps=2, credit="rlsd", teacher="ema",
                            teacher_offload=True)  # fmt: skip
    teacher = trainer.teacher
    assert mover.moves == ["cpu"]  # offloaded once built
    teacher.offload.device = FAKE_ACCELERATOR
    forwards: list[str] = []
    teacher.model.register_forward_pre_hook(lambda module, args: forwards.append(mover.where[id(module)]))
    ema_steps: list[str] = []
    ema_update = teacher._ema_update
    monkeypatch.setattr(teacher, "_ema_update", lambda policy: (ema_steps.append(mover.where[id(teacher.model)]),
                                                                ema_update(policy))[1])  # fmt: skip
    trainer.train()
    # per step: one teacher pass (one forward of the 4 rows) and one EMA update, each between an onload and an offload
    assert forwards == ["cuda", "cuda"] and ema_steps == ["cuda", "cuda"]
    assert mover.moves == ["cpu", *["cuda", "cpu"] * 4]
    assert (teacher.offload.onloads, teacher.offload.offloads) == (4, 4)
    assert mover.where[id(teacher.model)] == "cpu"

    plain = run(tokenizer, tmp_path / "plain")  # on a CPU the real move is a no-op: the same run without the flag
    for ours, theirs in ((trainer.model, plain.model), (teacher.model, plain.teacher.model)):
        theirs_state = theirs.state_dict()
        assert all(torch.equal(value, theirs_state[name]) for name, value in ours.state_dict().items())
    deltas = [[entry.get("rlsd/delta_mean") for entry in t.state.log_history] for t in (trainer, plain)]
    assert deltas[0] == deltas[1] and any(delta is not None for delta in deltas[0])
