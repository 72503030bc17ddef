"""Teacher kinds are a registry behind the `Teacher` protocol (`rlsd.teachers`): a kind registered from user code is
accepted by the config and trained with, without editing `config.py` or `trainer.py`; what the trainer does with a
kind (the sync callback, placement) follows what the kind declares, never its name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import build_trainer, make_config, make_model
from torch import nn

import rlsd.config
from rlsd.infra.validate import ConfigError
from rlsd.teachers import (
    TEACHER_KINDS,
    TEACHER_MODES,
    ExternalTeacher,
    InitialTeacher,
    SelfTeacher,
    Teacher,
    TeacherBuild,
    TeacherSyncCallback,
    build_teachers,
    teacher_kind,
)

TEACHER_KW = dict(sync_steps=1, ema_decay=0.5, temperature=1.0)


class PolicyEcho:
    """A minimal teacher kind written against the protocol only: it scores with the policy's current weights (what
    `live` does) and records how the trainer drives it."""

    model = None
    has_weights = False

    def __init__(self) -> None:
        self.forwards = 0
        self.steps: list[int] = []

    @classmethod
    def from_build(cls, build: TeacherBuild) -> PolicyEcho:
        return cls()

    @contextlib.contextmanager
    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        self.forwards += 1
        yield policy

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        self.steps.append(global_step)
        return False

    def follow(self, policy: nn.Module) -> None:
        pass

    def save(self, directory: str, unwrap: Callable[[nn.Module], nn.Module], *, write: bool = True) -> None:
        pass

    def load(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        pass


class Snapshot(SelfTeacher):
    """A new self-teacher mode in one subclass: a copy of the policy, hard-copied after every optimizer step."""

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        self._hard_copy(policy)
        return True


@pytest.fixture
def register() -> Iterator[Callable[..., Callable[[type], type]]]:
    """`teacher_kind` for test code; every kind registered through it is removed again after the test."""
    names: list[str] = []

    def kind(name: str, **declared: bool) -> Callable[[type], type]:
        names.append(name)
        return teacher_kind(name, **declared)

    yield kind
    for name in names:
        TEACHER_KINDS.pop(name, None)


@pytest.fixture
def accelerator():
    """The accelerate state that TRL's weight-copy helper reads, as a trainer would have set it up."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def has_sync_callback(trainer) -> bool:
    return any(isinstance(callback, TeacherSyncCallback) for callback in trainer.callback_handler.callbacks)


# ----------------------------------------------------------------------------------------------------- registry
def test_teacher_modes_list_the_built_in_kinds_and_config_reads_them_from_the_teacher_module():
    assert TEACHER_MODES == ("synced", "live", "initial", "ema")
    assert rlsd.config.TEACHER_MODES is TEACHER_MODES  # re-exported, not a second list
    assert list(TEACHER_KINDS)[:5] == [*TEACHER_MODES, "external"]
    assert {name for name, kind in TEACHER_KINDS.items() if kind.follows_policy} == {"synced", "ema", "near_future"}
    assert [name for name, kind in TEACHER_KINDS.items() if kind.loads_model] == ["external"]
    assert TEACHER_KINDS["external"].cls is ExternalTeacher and ExternalTeacher.mode == "external"


def test_a_kind_is_registered_once_and_must_say_how_it_is_built(register):
    with pytest.raises(ValueError, match="'live' is registered twice"):
        teacher_kind("live")(PolicyEcho)
    with pytest.raises(TypeError, match="no from_build"):
        register("bare")(type("Bare", (), {}))
    assert "bare" not in TEACHER_KINDS


def test_self_teacher_builds_the_class_registered_for_its_mode(tokenizer, register):
    policy = make_model(tokenizer)
    for mode in TEACHER_MODES:
        teacher = SelfTeacher(mode, policy, **TEACHER_KW)
        assert type(teacher) is TEACHER_KINDS[mode].cls and teacher.mode == mode
        assert isinstance(teacher, Teacher)
    with pytest.raises(ValueError, match="not a self-teacher mode"):
        SelfTeacher("external", policy, **TEACHER_KW)
    with pytest.raises(ValueError, match="is built by InitialTeacher, not"):
        TEACHER_KINDS["synced"].cls("initial", policy, **TEACHER_KW)


def test_a_new_self_teacher_mode_is_one_registered_subclass(tokenizer, register, accelerator):
    register("snapshot", follows_policy=True)(Snapshot)
    policy = make_model(tokenizer)
    teacher = SelfTeacher("snapshot", policy, **TEACHER_KW)
    assert isinstance(teacher, Snapshot) and teacher.model is not None and teacher.has_weights
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(teacher.model.parameters()), next(policy.parameters()))
    assert teacher.on_optimizer_step(1, policy)
    assert all(torch.equal(t, p) for t, p in zip(teacher.model.parameters(), policy.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------------- config
def test_the_config_reads_the_registry_when_it_validates(tmp_path, register):
    with pytest.raises(ValueError, match="teacher='echo' is not one of synced, live, initial, ema"):
        make_config(tmp_path, teacher="echo")
    register("echo")(PolicyEcho)
    assert make_config(tmp_path, teacher="echo").teacher == "echo"
    with pytest.raises(ConfigError, match="'echo', a self-teacher mode, but teacher_model"):
        make_config(tmp_path, teacher="echo", teacher_model="some/teacher")


def test_a_kind_that_loads_a_model_is_selected_with_teacher_model(tmp_path, register):
    """A served teacher (its log-probs from elsewhere) declares `loads_model`: it needs `teacher_model`."""
    register("served", loads_model=True)(PolicyEcho)
    assert make_config(tmp_path, teacher="served", teacher_model="http://host/model").teacher == "served"
    with pytest.raises(ConfigError, match="'served' but teacher_model is not set"):
        make_config(tmp_path, teacher="served")
    assert make_config(tmp_path, teacher_model="some/teacher").teacher == "external"  # the default still maps there


# ------------------------------------------------------------------------------------------------ build_teachers
def test_build_teachers_places_only_the_models_the_teachers_own(tokenizer, tmp_path):
    placed: list[nn.Module] = []

    def place(model: nn.Module) -> nn.Module:
        placed.append(model)
        return model

    policy = make_model(tokenizer)
    live = TeacherBuild(make_config(tmp_path, teacher="live"), policy)
    teachers = build_teachers(live, place, uses_teacher=True, sdpg_reference=True)
    assert type(teachers.teacher).__name__ == "LiveTeacher" and teachers.mad == []
    assert isinstance(teachers.reference, InitialTeacher)
    assert placed == [teachers.reference.model]  # the live teacher owns no model
    synced = TeacherBuild(make_config(tmp_path), policy)
    teachers = build_teachers(synced, place, uses_teacher=True, sdpg_reference=False)
    assert teachers.reference is None and placed[-1] is teachers.teacher.model and len(placed) == 2
    assert build_teachers(synced, place, uses_teacher=False, sdpg_reference=False) == (None, [], None)
    assert len(placed) == 2


# ------------------------------------------------------------------------------------------------------ trainer
def test_a_registered_kind_trains_without_editing_the_config_or_the_trainer(tokenizer, tmp_path, register):
    register("echo", follows_policy=True)(PolicyEcho)
    trainer = build_trainer(tokenizer, tmp_path, teacher="echo", max_steps=2)
    assert isinstance(trainer.teacher, PolicyEcho) and isinstance(trainer.teacher, Teacher)
    assert has_sync_callback(trainer)
    trainer.train()
    assert trainer.teacher.forwards >= 2  # the rule's teacher pass of each rollout went through the kind
    assert trainer.teacher.steps == [1, 2]  # it declares it follows the policy: told after every optimizer step
    logged = [entry for entry in trainer.state.log_history if "rlsd/teacher_synced" in entry]
    assert len(logged) == 2 and all(entry["rlsd/teacher_synced"] == 0.0 for entry in logged)


@pytest.mark.parametrize("mode", [*TEACHER_MODES, "external"])
def test_the_sync_callback_is_added_exactly_for_kinds_that_follow_the_policy(tokenizer, tmp_path, teacher_dir, mode):
    config = {"teacher_model": str(teacher_dir)} if mode == "external" else {"teacher": mode}
    trainer = build_trainer(tokenizer, tmp_path, **config)
    assert trainer.args.teacher == mode
    assert has_sync_callback(trainer) == TEACHER_KINDS[mode].follows_policy


def test_no_sync_callback_without_a_teacher(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher="synced")
    assert trainer.teacher is None and not has_sync_callback(trainer)
