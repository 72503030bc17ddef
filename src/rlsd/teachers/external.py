"""The external teacher (`ExternalTeacher`, `RLSDConfig.teacher_model`): a separate frozen model, loaded as TRL loads
its reference model once its vocabulary and tokenizer are checked against the student's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoTokenizer
from trl.trainer.utils import create_model_from_path

from rlsd.infra.guards import check_plain_lm_head
from rlsd.infra.validate import check_model_folder
from rlsd.teachers.base import (
    EXTERNAL_TEACHER,
    TEACHER_STATE_FILE,
    TeacherBuild,
    _install_teacher_head,
    read_teacher_state,
    teacher_kind,
)
from rlsd.teachers.offload import TeacherOffload, resident
from rlsd.teachers.vocabulary import check_same_tokenizer, check_same_vocabulary

logger = logging.getLogger(__name__)


@teacher_kind(EXTERNAL_TEACHER, loads_model=True)
class ExternalTeacher:
    """A separate frozen teacher model (`RLSDConfig.teacher_model`), with `SelfTeacher`'s interface: it scores
    through a fused log-prob head of its own, never follows the policy and keeps no weights in checkpoints (only
    its state file, which names the model). `from_build` loads it (`external_teacher`); `build_teachers` places it."""

    mode: str
    uses_disabled_adapter = False
    adapter_name = None
    offload: TeacherOffload | None = None  # set by `offload_teachers` (`teacher_offload`): the model waits on the CPU

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        temperature: float,
        with_entropy: bool = False,
        cast_lm_head_to_fp32: bool = False,
    ) -> None:
        model.__dict__.pop("forward", None)
        _install_teacher_head(model, temperature, with_entropy, cast_lm_head_to_fp32)
        model.eval()
        model.requires_grad_(False)
        self.model: nn.Module | None = model
        self.name = name
        self.last_sync_step = 0
        self.shadow = None

    @classmethod
    def from_build(cls, build: TeacherBuild) -> ExternalTeacher:
        """The run's `teacher_model`, loaded and checked (`external_teacher`)."""
        return external_teacher(build, build.args.teacher_model)

    @property
    def has_weights(self) -> bool:
        """False: the teacher's weights are never trained, so checkpoints do not carry them."""
        return False

    @contextlib.contextmanager
    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        """Yield the external model (the policy is left alone), on the accelerator while it scores."""
        with resident(self):
            yield self.model

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """An external teacher never follows the policy."""
        return False

    def follow(self, policy: nn.Module) -> None:
        """Nothing to restart: the teacher does not depend on the policy."""

    def save(self, directory: str, unwrap: Callable[[nn.Module], nn.Module], *, write: bool = True) -> None:
        """Write the state file only (mode and model name)."""
        if not write:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TEACHER_STATE_FILE), "w") as f:
            json.dump({"mode": self.mode, "last_sync_step": 0, "teacher_model": self.name}, f)

    def load(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        """Check the state file: a checkpoint of a self-teacher run is refused; another model name is a warning
        (the same model may have moved)."""
        state = read_teacher_state(directory, self.mode)
        if state.get("teacher_model") != self.name:
            logger.warning("checkpoint %s was trained with teacher_model=%r, resumed with %r", directory,
                           state.get("teacher_model"), self.name)  # fmt: skip


def external_teacher(build: TeacherBuild, name: str) -> ExternalTeacher:
    """`name` (`teacher_model`, or one of MAD-OPD's teachers) loaded as TRL loads its reference model
    (`create_model_from_path`; device_map None when distributed), after its vocabulary and tokenizer are checked
    against the student's on a sample of the training text (`build.texts()`); a distillation run also refuses a head
    that rescales its logits. Not placed (`build_teachers` places it)."""
    args = build.args
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"):
        init_kwargs["device_map"] = None  # "auto" fails under distributed training
    model = load_external_teacher(
        name, init_kwargs, build.policy, build.tokenizer, build.texts(), trust_remote_code=args.trust_remote_code
    )
    if build.distill:
        check_plain_lm_head(model, "distill_loss")
    return ExternalTeacher(
        model, name, temperature=build.temperature, with_entropy=build.with_entropy,
        cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
    )  # fmt: skip


def load_external_teacher(
    name: str,
    init_kwargs: dict[str, Any],
    policy: nn.Module,
    student_tokenizer: Any,
    sample_texts: list[str],
    *,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The teacher model `name`, loaded with TRL's `create_model_from_path(name, **init_kwargs)` after its
    vocabulary and tokenizer are checked against the student's (`check_same_vocabulary`, `check_same_tokenizer`;
    both before the weights are loaded). `dtype` and `attn_implementation` default to the policy's."""
    check_model_folder(name, "teacher_model")  # a missing folder would read as a bad hub name
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    check_same_vocabulary(policy.config, config, name)
    check_same_tokenizer(student_tokenizer, _teacher_tokenizer(name, trust_remote_code), sample_texts, name)
    kwargs = dict(init_kwargs)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    kwargs.setdefault("dtype", policy.dtype)
    kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
    return create_model_from_path(name, **kwargs)


def _teacher_tokenizer(name: str, trust_remote_code: bool) -> Any | None:
    """The tokenizer saved with the teacher, or None when there is none to load."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None
