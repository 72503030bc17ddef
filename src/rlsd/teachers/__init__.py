"""The teacher's weights: the `Teacher` protocol the trainer scores through, the registry of teacher kinds
(`@teacher_kind`, what `RLSDConfig.teacher` selects), the self-teacher modes (which copy of the policy, if any, they
keep and when they follow it, section 2.3), the external teacher, and `build_teachers` (a run's teachers).

Its modules: `base` (the protocol, `TeacherBuild`, the registry, the scoring head helpers), `self_teachers`,
`adapters` (a PEFT policy's teacher adapter), `sharding` (FSDP2 shards, ZeRO-3 partitions), `external` and
`vocabulary` (the external teacher and its tokenizer check), `build` (`build_teachers`, `TeacherSyncCallback`)."""

from __future__ import annotations

from rlsd.teachers.base import (
    DEFAULT_TEACHER,
    EXTERNAL_TEACHER,
    INITIAL_ADAPTER,
    LOW_PRECISION,
    TEACHER_ADAPTER,
    TEACHER_KINDS,
    TEACHER_SHADOW_FILE,
    TEACHER_STATE_FILE,
    TEACHER_WEIGHTS_FILE,
    TRL_REF_ADAPTER,
    KindClass,
    Teacher,
    TeacherBuild,
    TeacherKind,
    Unwrap,
    backbone_and_head,
    get_teacher_kind,
    read_teacher_state,
    teacher_kind,
    teacher_modes,
)
from rlsd.teachers.self_teachers import (
    TEACHER_MODES,
    EmaTeacher,
    InitialTeacher,
    LiveTeacher,
    SelfTeacher,
    SyncedTeacher,
)

# isort: split
# the external kind is registered after the self-teacher modes (`TEACHER_KINDS` keeps registration order)
from rlsd.teachers.adapters import _disable_adapter_dropout
from rlsd.teachers.build import Teachers, TeacherSyncCallback, build_teachers
from rlsd.teachers.external import ExternalTeacher, external_teacher, load_external_teacher
from rlsd.teachers.near_future import NPO_KNOBS, NearFutureTeacher  # registers NPO's guide, "near_future"
from rlsd.teachers.sharding import is_zero3_partitioned, place_frozen
from rlsd.teachers.vocabulary import check_same_tokenizer, check_same_vocabulary, sample_texts

__all__ = [
    "DEFAULT_TEACHER",
    "EXTERNAL_TEACHER",
    "INITIAL_ADAPTER",
    "LOW_PRECISION",
    "NPO_KNOBS",
    "TEACHER_ADAPTER",
    "TEACHER_KINDS",
    "TEACHER_MODES",
    "TEACHER_SHADOW_FILE",
    "TEACHER_STATE_FILE",
    "TEACHER_WEIGHTS_FILE",
    "TRL_REF_ADAPTER",
    "EmaTeacher",
    "ExternalTeacher",
    "InitialTeacher",
    "KindClass",
    "LiveTeacher",
    "NearFutureTeacher",
    "SelfTeacher",
    "SyncedTeacher",
    "Teacher",
    "TeacherBuild",
    "TeacherKind",
    "TeacherSyncCallback",
    "Teachers",
    "Unwrap",
    "_disable_adapter_dropout",
    "backbone_and_head",
    "build_teachers",
    "check_same_tokenizer",
    "check_same_vocabulary",
    "external_teacher",
    "get_teacher_kind",
    "is_zero3_partitioned",
    "load_external_teacher",
    "place_frozen",
    "read_teacher_state",
    "sample_texts",
    "teacher_kind",
    "teacher_modes",
]
