"""Teacher offload (`RLSDConfig.teacher_offload`): a teacher's own weights (a synced / EMA / initial copy, an external
model, SDPG's reference, MAD-OPD's teachers) and an EMA's fp32 shadow kept off the accelerator between uses, moved
to it for each teacher pass and each update from the policy, and back after. The accelerator then holds the teacher
only while it scores; each use pays two host-device copies of its weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlsd.infra.validate import ConfigError

OFFLOAD_DEVICE = torch.device("cpu")
"""Where an offloaded teacher waits between uses."""


def move_weights(teacher: Any, device: torch.device) -> None:
    """Move `teacher`'s model and its EMA shadow (if any) to `device` (a no-op where they already are)."""
    teacher.model.to(device)
    shadow = getattr(teacher, "shadow", None)
    if shadow is not None:
        teacher.shadow = [None if s is None else s.to(device) for s in shadow]


@dataclass
class TeacherOffload:
    """Moves one teacher between `device` (where it was placed, where it runs) and `OFFLOAD_DEVICE`, counting the
    moves: `resident` holds it on `device` for one use (nested uses move it once)."""

    device: torch.device
    onloads: int = 0
    offloads: int = 0
    depth: int = 0

    @contextlib.contextmanager
    def resident(self, teacher: Any) -> Iterator[None]:
        """`teacher` on `device` within the block, offloaded after (even on an exception)."""
        if self.depth == 0:
            move_weights(teacher, self.device)
            self.onloads += 1
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                move_weights(teacher, OFFLOAD_DEVICE)
                self.offloads += 1


def resident(teacher: Any) -> contextlib.AbstractContextManager[None]:
    """The block in which `teacher` uses its weights: on the accelerator when it is offloaded, else nothing to do."""
    offload = getattr(teacher, "offload", None)
    return offload.resident(teacher) if offload is not None else contextlib.nullcontext()


def offload_teachers(teachers: list[Any], distributed_type: str) -> None:
    """Offload every teacher that owns a model (placed already): each gets a `TeacherOffload` and waits on the CPU.
    Refused under DeepSpeed / FSDP (their placement shards or wraps the model: DeepSpeed's own `offload_param` is the
    tool there) and when no teacher of the run owns weights (live, or a PEFT policy's adapter: nothing to move)."""
    if distributed_type in ("DEEPSPEED", "FSDP"):
        raise ConfigError(
            "--teacher_offload",
            f"moves a teacher's whole model between devices, which a {distributed_type}-placed model does not allow",
            "use DeepSpeed's offload_param for the frozen model, or train without teacher_offload",
        )
    owners = [teacher for teacher in teachers if teacher is not None and teacher.model is not None]
    if not owners:
        raise ConfigError(
            "--teacher_offload",
            "no teacher of this run keeps weights of its own (the live teacher and a PEFT policy's adapter teachers "
            "score with the policy's weights)",
            "use a copy (teacher='synced', 'ema' or 'initial' on a full model) or teacher_model, or drop the flag",
        )
    for teacher in owners:
        if not hasattr(type(teacher), "offload"):
            fix = "give its class an `offload` attribute and use `rlsd.teachers.offload.resident`"
            raise ConfigError("--teacher_offload", f"teacher kind {teacher.mode!r} does not support offloading", fix)
        teacher.offload = TeacherOffload(device=_device_of(teacher.model))
        move_weights(teacher, OFFLOAD_DEVICE)


def _device_of(model: nn.Module) -> torch.device:
    """The device `model`'s first parameter was placed on."""
    return next(model.parameters()).device
