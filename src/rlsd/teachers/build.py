"""A run's teachers (`build_teachers`: the teacher of kind `RLSDConfig.teacher`, MAD-OPD's further teachers, SDPG's
reference), each model placed as TRL places its reference model, and `TeacherSyncCallback`, which has the teacher
follow the policy after every optimizer step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from torch import nn
from transformers import TrainerCallback

from rlsd.teachers.base import Teacher, TeacherBuild, get_teacher_kind
from rlsd.teachers.external import external_teacher
from rlsd.teachers.offload import offload_teachers
from rlsd.teachers.self_teachers import InitialTeacher

logger = logging.getLogger(__name__)


class Teachers(NamedTuple):
    """A run's teachers: the teacher (None without one), MAD-OPD's further teachers, SDPG's reference (or None)."""

    teacher: Teacher | None
    mad: list[Teacher]
    reference: Teacher | None


def build_teachers(
    build: TeacherBuild, place: Callable[[nn.Module], nn.Module], *, uses_teacher: bool, sdpg_reference: bool
) -> Teachers:
    """The teacher of kind `args.teacher` (when the run `uses_teacher`), MAD-OPD's `mad_opd_teachers` and, with
    `sdpg_reference`, SDPG's anchor to the initial model; every model a teacher owns is placed by `place` (as TRL
    places its reference model), in that order (a frozen PEFT reference reuses the teacher's snapshot adapter). With
    `teacher_offload`, each such model then waits on the CPU between uses (`rlsd.teachers.offload`)."""
    args = build.args
    if args.teacher_model is not None and not uses_teacher:
        logger.warning("teacher_model is set but credit=%r and distill_loss='none' use no teacher: not loaded",
                       args.credit)  # fmt: skip
    if not uses_teacher:
        return Teachers(None, [], None)
    teacher = _placed(get_teacher_kind(args.teacher).cls.from_build(build), place)
    mad = [_placed(external_teacher(build, name), place) for name in args.mad_opd_teachers or []]
    reference = None
    if sdpg_reference:
        reference = InitialTeacher(
            InitialTeacher.mode, build.policy, sync_steps=1, ema_decay=0.0, temperature=build.temperature,
            cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
        )  # fmt: skip
        reference = _placed(reference, place)
    if getattr(args, "teacher_offload", False):
        offload_teachers([teacher, *mad, reference], args.distributed_state.distributed_type)
    return Teachers(teacher, mad, reference)


def _placed(teacher: Teacher, place: Callable[[nn.Module], nn.Module]) -> Teacher:
    """`teacher` with the model it owns (if any) placed."""
    if teacher.model is not None:
        teacher.model = place(teacher.model)
    return teacher


class TeacherSyncCallback(TrainerCallback):
    """Calls the teacher's `on_optimizer_step` at the end of every optimizer step (kinds that declare
    `follows_policy`)."""

    def __init__(self, trainer: object) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        bind = getattr(self.trainer.teacher, "bind_optimizer", None)
        if bind is not None:  # a kind that rolls the optimizer back (NPO's guide) is handed HF's optimizer first
            bind(kwargs.get("optimizer"))
        self.trainer._on_teacher_step(state.global_step)
