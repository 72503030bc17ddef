"""What every teacher module shares: the `Teacher` protocol the trainer scores through, `TeacherBuild` (what a kind is
built from), the registry of teacher kinds (`@teacher_kind`, what `RLSDConfig.teacher` selects), the checkpoint file
and adapter names, and the scoring head helpers (`backbone_and_head`, the fused log-prob head a teacher installs)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn
from trl.trainer.utils import add_fused_lm_head

from rlsd.teachers.vocabulary import sample_texts

TEACHER_WEIGHTS_FILE = "rlsd_teacher.pt"
TEACHER_STATE_FILE = "rlsd_teacher.json"
TEACHER_SHADOW_FILE = "rlsd_teacher_ema_shadow.pt"
LOW_PRECISION = (torch.bfloat16, torch.float16)
TEACHER_ADAPTER = "rlsd_teacher"  # the synced / EMA teacher of a PEFT policy: a second adapter on the same base
INITIAL_ADAPTER = "rlsd_initial"  # a frozen snapshot of a PEFT policy's pretrained starting adapter
TRL_REF_ADAPTER = "ref"  # TRL's frozen copy of a pretrained starting adapter (GRPOTrainer, beta != 0)
DEFAULT_TEACHER = "synced"
"""`RLSDConfig.teacher` when left unset (with `teacher_model` set, the external teacher is chosen instead)."""
EXTERNAL_TEACHER = "external"
"""`teacher` of a run with `teacher_model`: a separate frozen model (`ExternalTeacher`)."""
Unwrap = Callable[[nn.Module], nn.Module]
"""The accelerator's `unwrap_model`: the plain module under a DDP / DeepSpeed / FSDP wrapper."""


@runtime_checkable
class Teacher(Protocol):
    """What the trainer and its collaborators use of a teacher, whatever its kind (built-in or `@teacher_kind` from
    user code). `model` is the module it owns, which `build_teachers` places; None when it scores with the policy."""

    mode: str
    model: nn.Module | None

    @property
    def has_weights(self) -> bool:
        """True when checkpoints carry weights of its own (`TEACHER_WEIGHTS_FILE`)."""

    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> AbstractContextManager[nn.Module]:
        """A context yielding the module whose fused log-prob head scores [teacher prompt ; completion]."""

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """Follow the policy after optimizer step `global_step` (kinds that declare `follows_policy`); True when the
        teacher's weights changed."""

    def follow(self, policy: nn.Module) -> None:
        """Restart from `policy`: a resume whose checkpoint lacks the teacher's state."""

    def save(self, directory: str, unwrap: Unwrap, *, write: bool = True) -> None:
        """Write its state (`TEACHER_STATE_FILE`, and its weights when `has_weights`) into a checkpoint folder; every
        process calls it, only those with `write` write."""

    def load(self, directory: str, unwrap: Unwrap) -> None:
        """Restore what `save` wrote (every process calls it)."""


@dataclass(frozen=True)
class TeacherBuild:
    """What a teacher kind is built from: values, never the trainer. `args` is the run's `RLSDConfig` (the kinds'
    knobs); `tokenizer`, `dataset` and `text_columns` feed a separate model's tokenizer check; `with_entropy` (the
    rule reads the teacher's entropy) and `distill` (a distillation loss projects its hidden states, so a loaded
    model's LM head must be plain) shape its scoring head."""

    args: Any
    policy: nn.Module  # unwrapped
    tokenizer: Any = None
    dataset: Any = None
    text_columns: tuple[str, ...] = ("prompt",)
    temperature: float = 1.0
    with_entropy: bool = False
    distill: bool = False

    def texts(self) -> list[str]:
        """A sample of the training text (read on demand: only a kind that loads a model needs it)."""
        return sample_texts(self.dataset, self.text_columns)


@dataclass(frozen=True)
class TeacherKind:
    """A registered teacher kind: its class (built by `cls.from_build(build)`) and what it declares. `follows_policy`:
    its weights follow the policy, so the trainer calls `on_optimizer_step` after every optimizer step.
    `loads_model`: `teacher_model` selects it (a separate model), `teacher` alone does not."""

    name: str
    cls: type
    follows_policy: bool
    loads_model: bool


TEACHER_KINDS: dict[str, TeacherKind] = {}
"""Every registered teacher kind by name: what `RLSDConfig.teacher` selects from."""
KindClass = TypeVar("KindClass", bound=type)


def teacher_kind(
    name: str, *, follows_policy: bool = False, loads_model: bool = False
) -> Callable[[KindClass], KindClass]:
    """Register a class implementing `Teacher` as kind `name` (set as its `mode`): `build_teachers` builds it with its
    `from_build(build: TeacherBuild)` classmethod. Adding a kind is this one decorated class, here or in user code."""

    def register(cls: KindClass) -> KindClass:
        if name in TEACHER_KINDS:
            raise ValueError(f"teacher kind {name!r} is registered twice")
        if not callable(getattr(cls, "from_build", None)):
            raise TypeError(f"teacher kind {name!r}: {cls.__name__} has no from_build(build) classmethod")
        cls.mode = name
        TEACHER_KINDS[name] = TeacherKind(name, cls, follows_policy, loads_model)
        return cls

    return register


def teacher_modes() -> tuple[str, ...]:
    """The kinds `teacher` selects on its own (all but those `teacher_model` selects), in registration order, those
    registered after import included."""
    return tuple(name for name, kind in TEACHER_KINDS.items() if not kind.loads_model)


def get_teacher_kind(name: str) -> TeacherKind:
    """The registered kind `name`; an unknown name is refused with the self-teacher modes listed."""
    if name not in TEACHER_KINDS:
        raise ValueError(f"teacher={name!r} is not one of {', '.join(teacher_modes())}")
    return TEACHER_KINDS[name]


def _is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model (duck-typed so that PEFT stays optional)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def read_teacher_state(directory: str, mode: str) -> dict[str, Any]:
    """A checkpoint's teacher state json, refused when RLSD did not write it or wrote it for another teacher mode."""
    state_path = os.path.join(directory, TEACHER_STATE_FILE)
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"checkpoint {directory} has no {TEACHER_STATE_FILE}: it was not written by RLSD")
    with open(state_path) as f:
        state = json.load(f)
    if state["mode"] != mode:
        raise ValueError(f"checkpoint teacher mode {state['mode']!r} differs from teacher={mode!r}")
    return state


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body whose output TRL's fused head projects, and the LM head (PEFT wrappers looked through)."""
    base = model.get_base_model() if _is_peft_model(model) else model
    return base.base_model, base.get_output_embeddings()


def _install_teacher_head(
    model: nn.Module, temperature: float, with_entropy: bool, cast_lm_head_to_fp32: bool
) -> None:
    """TRL's fused log-prob head on `model`, computing the entropy only when the rule reads it."""
    add_fused_lm_head(
        model,
        temperature=temperature,
        cast_lm_head_to_fp32=cast_lm_head_to_fp32,
        outputs=("log_probs", "entropy") if with_entropy else ("log_probs",),
    )


def _fp32_linear(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`head`'s projection in float32, as TRL's `cast_lm_head_to_fp32` patches the policy's head (bound to `head`)."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(hidden_states.float(), head.weight.float(), bias)

    return forward
