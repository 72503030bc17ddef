"""The teacher's weights: the `Teacher` protocol the trainer scores through, the registry of teacher kinds
(`@teacher_kind`, what `RLSDConfig.teacher` selects), the self-teacher modes (which copy of the policy, if any, they
keep and when they follow it, section 2.3), the external teacher, and `build_teachers` (a run's teachers)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoTokenizer, TrainerCallback
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, use_adapter

from rlsd.infra.guards import check_plain_lm_head

logger = logging.getLogger(__name__)

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


class SelfTeacher:
    """Owns the weights of a teacher that is the policy itself, for one training run. Each mode is a registered
    subclass (`@teacher_kind`) that declares `copies_policy` (False: it scores with the current policy weights),
    `frozen` (it keeps the starting weights: see PEFT below) and how it follows the policy (`on_optimizer_step`);
    `SelfTeacher(mode, policy, ...)` builds the subclass registered for `mode`. The built-in modes:

    `synced`: a frozen copy, hard-copied from the policy after every `sync_steps` optimizer steps.
    `ema`: a copy updated after each optimizer step as decay * teacher + (1 - decay) * policy; bf16 / fp16
        parameters are averaged in an fp32 shadow (saved in checkpoints), so that small steps are not rounded away.
    `initial`: a copy that never changes.
    `live`: no copy: the current policy weights.

    With a PEFT policy no model is copied (`model` stays None): `synced` / `ema` keep the teacher as a second adapter
    (`rlsd_teacher`) on the policy's base, a copy of the policy's adapter that follows it as above. A `frozen` mode
    (`initial`) uses TRL's `ref` adapter when the model has one, else a frozen snapshot adapter (`rlsd_initial`,
    shared by the run's frozen teachers) of a pretrained starting adapter; a fresh LoRA (every B = 0, no DoRA) is the
    base model, so it then just disables the adapter (`uses_disabled_adapter`: equal log-probs, no extra weights).

    Under FSDP2 the teacher's parameters (and the EMA shadow) are DTensor shards: `save` gathers full tensors (a
    collective, so every process calls it) and `load` gives each process its own shard back.
    """

    mode: str
    copies_policy: ClassVar[bool] = True
    frozen: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> SelfTeacher:
        """`SelfTeacher(mode, ...)` is an instance of the class registered for `mode`; a subclass builds itself."""
        if cls is SelfTeacher:
            cls = _self_teacher_class(args[0] if args else kwargs["mode"])
        return super().__new__(cls)

    def __init__(
        self,
        mode: str,
        policy: nn.Module,
        *,
        sync_steps: int,
        ema_decay: float,
        temperature: float,
        with_entropy: bool = False,
        cast_lm_head_to_fp32: bool = False,
    ) -> None:
        registered = _self_teacher_class(mode)
        if registered is not type(self):
            raise ValueError(f"teacher={mode!r} is built by {registered.__name__}, not {type(self).__name__}")
        self.mode = mode
        self.sync_steps = sync_steps
        self.ema_decay = ema_decay
        self.last_sync_step = 0
        self.shadow: list[torch.Tensor | None] | None = None  # fp32 EMA of the low-precision teacher parameters
        self.model: nn.Module | None = None
        self.uses_disabled_adapter = False
        self.adapter_name: str | None = None  # the teacher's adapter on a PEFT policy
        self.policy_adapter: str | None = None  # the policy's own (trained) adapter
        self._peft_policy: nn.Module | None = None  # the PEFT policy that carries `adapter_name`
        self._policy_base: nn.Module | None = None  # the policy's base model, whose forward the teacher borrows
        self._scoring_forward: Callable[..., object] | None = None  # its fused forward with the teacher's outputs
        if not self.copies_policy:
            self._borrow_policy_head(policy, temperature, with_entropy, cast_lm_head_to_fp32)
            return
        if _is_peft_model(policy):
            self._init_adapter_teacher(policy)
            self._borrow_policy_head(policy, temperature, with_entropy, cast_lm_head_to_fp32)
            return
        _refuse_zero3_copy(mode, policy)
        self.model = self._frozen_copy(policy, temperature, with_entropy, cast_lm_head_to_fp32)

    def _init_adapter_teacher(self, policy: nn.Module) -> None:
        """Pick (or create) the adapter that is the teacher of a PEFT policy: see the class docstring."""
        self.policy_adapter = _single_active_adapter(policy)
        if self.frozen and _is_identity_lora(policy, self.policy_adapter):
            self.uses_disabled_adapter = True
            return
        self._peft_policy = policy
        if self.frozen and TRL_REF_ADAPTER in policy.peft_config:
            self.adapter_name = TRL_REF_ADAPTER
            return
        self.adapter_name = INITIAL_ADAPTER if self.frozen else TEACHER_ADAPTER
        if self.adapter_name in policy.peft_config:
            if self.frozen:  # another frozen teacher of this run (SDPG's reference) made it
                return
            raise ValueError(f"the PEFT policy already has an adapter named {self.adapter_name!r}")
        _refuse_zero3_copy(self.mode, policy)
        _add_frozen_adapter_copy(policy, self.policy_adapter, self.adapter_name)

    def _borrow_policy_head(
        self, policy: nn.Module, temperature: float, with_entropy: bool, cast_lm_head_to_fp32: bool
    ) -> None:
        """A teacher that runs on the policy (live, an adapter) scores through a fused head of its own: TRL's head on
        the policy also computes the entropy over the vocabulary for every call, which the teacher rarely needs. The
        policy's forward is kept and swapped in only around teacher forwards (`forward_context`)."""
        base = policy.get_base_model() if _is_peft_model(policy) else policy
        policy_forward = base.__dict__.pop("forward", None)  # TRL's fused forward, if installed
        _install_teacher_head(base, temperature, with_entropy, cast_lm_head_to_fp32)
        self._scoring_forward = base.__dict__.pop("forward")
        if policy_forward is not None:
            base.forward = policy_forward
        self._policy_base = base

    @contextlib.contextmanager
    def _teacher_head(self) -> Iterator[None]:
        """Within the context, the policy's base scores with the teacher's fused head (no-op for a copy)."""
        if self._scoring_forward is None:
            yield
            return
        base = self._policy_base
        policy_forward = base.__dict__.get("forward")
        base.forward = self._scoring_forward
        try:
            yield
        finally:
            if policy_forward is None:
                base.__dict__.pop("forward", None)
            else:
                base.forward = policy_forward

    @staticmethod
    def _frozen_copy(
        policy: nn.Module, temperature: float, with_entropy: bool, cast_lm_head_to_fp32: bool = False
    ) -> nn.Module:
        """A no-grad eval-mode copy of the policy with its own fused log-prob head, installed as TRL installs the
        policy's (the same `cast_lm_head_to_fp32`, so that equal weights give exactly equal log-probs)."""
        teacher = copy.deepcopy(policy)
        teacher.__dict__.pop("forward", None)  # drop the copied patch, whose closure points at the policy
        base = teacher.get_base_model() if _is_peft_model(teacher) else teacher
        base.__dict__.pop("forward", None)
        head = base.get_output_embeddings()
        if "forward" in head.__dict__:  # TRL's fp32 head patch, whose closure points at the policy's head
            head.forward = _fp32_linear(head)
        _install_teacher_head(base, temperature, with_entropy, cast_lm_head_to_fp32)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    @property
    def has_weights(self) -> bool:
        """True when the teacher has weights of its own (a copy or an adapter), which checkpoints carry."""
        return self.model is not None or self.adapter_name is not None

    def adapter_pairs(self, policy: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(teacher, policy) parameter pairs of the two adapters of a PEFT policy, in parameter order."""
        return _adapter_pairs(policy, self.policy_adapter, self.adapter_name)

    def _pairs(self, policy: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(teacher, policy) pairs of the parameters the teacher keeps: the whole copy, or the adapter."""
        if self.model is not None:
            return list(zip(self.model.parameters(), policy.parameters(), strict=True))
        return self.adapter_pairs(policy)

    @contextlib.contextmanager
    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        """Yield the module that scores teacher sequences: the copy, or the policy (live, with the teacher's adapter
        active, or with its adapter disabled); the policy's adapter and trainable flags are restored after."""
        if self.model is not None:
            yield self.model
        elif self.adapter_name is not None:
            with _adapter_active(unwrapped_policy, self.adapter_name), self._teacher_head():
                yield policy
        elif self.uses_disabled_adapter:
            with use_adapter(unwrapped_policy, adapter_name=None), self._teacher_head():
                yield policy
        else:
            with self._teacher_head():
                yield policy

    @classmethod
    def from_build(cls, build: TeacherBuild) -> SelfTeacher:
        """This mode's teacher of `build.policy`, with the run's `teacher_sync_steps` and `teacher_ema_decay`."""
        args = build.args
        return cls(
            cls.mode, build.policy, sync_steps=args.teacher_sync_steps, ema_decay=args.teacher_ema_decay,
            temperature=build.temperature, with_entropy=build.with_entropy,
            cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
        )  # fmt: skip

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """Follow the policy after optimizer step `global_step`; True when the teacher's weights changed (never, unless
        the mode overrides it)."""
        return False

    def follow(self, policy: nn.Module) -> None:
        """Restart the teacher from `policy` (a resume whose checkpoint lacks the teacher): a hard copy of the
        weights it keeps; TRL's `ref` adapter is TRL's own and is left alone."""
        if self.adapter_name == TRL_REF_ADAPTER or not self.has_weights:
            return
        self._hard_copy(policy)
        self.shadow = None

    @torch.no_grad()
    def _hard_copy(self, policy: nn.Module) -> None:
        """teacher <- policy (the whole copy through TRL's sync, or the adapter weights only)."""
        if self.model is not None:
            SyncRefModelCallback.sync_target_model(policy, self.model, alpha=1.0)
            return
        for target, source in self.adapter_pairs(policy):
            target.data.copy_(source.data)

    @torch.no_grad()
    def _ema_step(self, policy: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * policy; a bf16 / fp16 parameter is averaged in its fp32 shadow
        and rounded into the teacher (in its own precision, updates below one ulp would round away)."""
        alpha = 1.0 - self.ema_decay
        pairs = self._pairs(policy)
        if self.shadow is None:  # none under ZeRO-3, where TRL's update gathers the partitioned parameters
            partitioned = self.model is not None and is_zero3_partitioned(self.model)
            self.shadow = [
                target.detach().float().clone() if target.dtype in LOW_PRECISION and not partitioned else None
                for target, _ in pairs
            ]
        if self.model is not None and all(shadow is None for shadow in self.shadow):  # TRL's update, unchanged
            SyncRefModelCallback.sync_target_model(policy, self.model, alpha=alpha)
            return
        for (target, source), shadow in zip(pairs, self.shadow, strict=True):
            if shadow is None:
                target.data.mul_(1.0 - alpha).add_(source.data, alpha=alpha)
            else:
                shadow.mul_(1.0 - alpha).add_(source.data.float(), alpha=alpha)
                target.data.copy_(shadow)

    def save(self, directory: str, unwrap: Callable[[nn.Module], nn.Module], *, write: bool = True) -> None:
        """Write the teacher's weights (when it has its own: full tensors, or only its adapter), the EMA shadow and
        the sync state into a checkpoint folder. Every process must call it (gathering FSDP2 shards is a
        collective); only those with `write` (the one that saves) write files."""
        weights = self._weights_to_save(unwrap)
        shadow = None if self.shadow is None else [None if s is None else _full_tensor(s) for s in self.shadow]
        if not write:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TEACHER_STATE_FILE), "w") as f:
            json.dump({"mode": self.mode, "last_sync_step": self.last_sync_step}, f)
        if weights is not None:
            torch.save(weights, os.path.join(directory, TEACHER_WEIGHTS_FILE))
        if shadow is not None:
            torch.save(shadow, os.path.join(directory, TEACHER_SHADOW_FILE))

    def _weights_to_save(self, unwrap: Callable[[nn.Module], nn.Module]) -> dict[str, torch.Tensor] | None:
        """The teacher's full (unsharded) state dict, or its adapter's parameters by name; None without weights."""
        if self.model is not None:
            return _full_state_dict(unwrap(self.model))
        if self.adapter_name is not None:
            return {name: _full_tensor(p.detach()) for name, p in self._adapter_parameters(unwrap)}
        return None

    def _adapter_parameters(self, unwrap: Callable[[nn.Module], nn.Module]) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the teacher's adapter on the PEFT policy."""
        return _adapter_named_parameters(unwrap(self._peft_policy), self.adapter_name)

    def load(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        """Restore what `save` wrote (every process calls it; each gets its own shard back); a checkpoint from another
        teacher mode is refused."""
        state = read_teacher_state(directory, self.mode)
        self.last_sync_step = int(state["last_sync_step"])
        weights_path = os.path.join(directory, TEACHER_WEIGHTS_FILE)
        if self.model is not None:
            _load_full_state_dict(unwrap(self.model), weights_path)
        elif self.adapter_name is not None:
            self._load_adapter(unwrap, weights_path)
        shadow_path = os.path.join(directory, TEACHER_SHADOW_FILE)
        self.shadow = None  # without a saved shadow, the next EMA step starts one from the restored weights
        if os.path.exists(shadow_path):
            shadow = torch.load(shadow_path, map_location="cpu", weights_only=True)
            targets = self._teacher_parameters(unwrap)
            self.shadow = [None if s is None else _like(p, s) for s, p in zip(shadow, targets, strict=True)]

    def _teacher_parameters(self, unwrap: Callable[[nn.Module], nn.Module]) -> list[nn.Parameter]:
        """The parameters the teacher keeps (the shadow's order): the copy's, or its adapter's."""
        if self.model is not None:
            return list(self.model.parameters())
        return [teacher for teacher, _ in self.adapter_pairs(unwrap(self._peft_policy))]

    @torch.no_grad()
    def _load_adapter(self, unwrap: Callable[[nn.Module], nn.Module], path: str) -> None:
        """Copy the saved adapter weights into the teacher's adapter (each process keeps its shard)."""
        weights = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(self._adapter_parameters(unwrap))
        if set(weights) != set(params):
            raise ValueError(f"{path} holds other adapter weights than the teacher adapter {self.adapter_name!r}")
        for name, p in params.items():
            p.data.copy_(_like(p, weights[name]))


@teacher_kind("synced", follows_policy=True)
class SyncedTeacher(SelfTeacher):
    """A frozen copy (or adapter), hard-copied from the policy after every `sync_steps` optimizer steps."""

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """Copy the policy in once `sync_steps` optimizer steps have passed since the last copy."""
        if global_step - self.last_sync_step < self.sync_steps:
            return False
        self._hard_copy(policy)
        self.last_sync_step = global_step
        return True


@teacher_kind("live")
class LiveTeacher(SelfTeacher):
    """The current policy weights: no copy, nothing to follow or save."""

    copies_policy = False


@teacher_kind("initial")
class InitialTeacher(SelfTeacher):
    """The policy's starting weights: a copy (or adapter) that never changes."""

    frozen = True


@teacher_kind("ema", follows_policy=True)
class EmaTeacher(SelfTeacher):
    """An exponential moving average of the policy, updated after every optimizer step."""

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """teacher <- decay * teacher + (1 - decay) * policy."""
        self._ema_step(policy)
        self.last_sync_step = global_step
        return True


TEACHER_MODES = teacher_modes()
"""The built-in self-teacher modes (the command line's choices for `teacher`, with "external"; validation reads the
registry, so a kind registered later is accepted too)."""


def _self_teacher_class(mode: str) -> type[SelfTeacher]:
    """The `SelfTeacher` subclass registered as `mode`; any other name is refused with the modes listed."""
    cls = get_teacher_kind(mode).cls
    if not issubclass(cls, SelfTeacher):
        raise ValueError(f"teacher={mode!r} is not a self-teacher mode (one of {', '.join(teacher_modes())})")
    return cls


@teacher_kind(EXTERNAL_TEACHER, loads_model=True)
class ExternalTeacher:
    """A separate frozen teacher model (`RLSDConfig.teacher_model`), with `SelfTeacher`'s interface: it scores
    through a fused log-prob head of its own, never follows the policy and keeps no weights in checkpoints (only
    its state file, which names the model). `from_build` loads it (`external_teacher`); `build_teachers` places it."""

    mode: str
    uses_disabled_adapter = False
    adapter_name = None

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
        """Yield the external model (the policy is left alone)."""
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
    places its reference model), in that order (a frozen PEFT reference reuses the teacher's snapshot adapter)."""
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
    return Teachers(teacher, mad, reference)


def _placed(teacher: Teacher, place: Callable[[nn.Module], nn.Module]) -> Teacher:
    """`teacher` with the model it owns (if any) placed."""
    if teacher.model is not None:
        teacher.model = place(teacher.model)
    return teacher


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
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    check_same_vocabulary(policy.config, config, name)
    check_same_tokenizer(student_tokenizer, _teacher_tokenizer(name, trust_remote_code), sample_texts, name)
    kwargs = dict(init_kwargs)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    kwargs.setdefault("dtype", policy.dtype)
    kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
    return create_model_from_path(name, **kwargs)


def check_same_vocabulary(student_config: Any, teacher_config: Any, name: str) -> None:
    """Refuse a teacher whose text vocabulary size differs from the student's (log-probs and distributions are
    compared token id by token id), naming both sizes."""
    student = student_config.get_text_config().vocab_size
    teacher = teacher_config.get_text_config().vocab_size
    if student != teacher:
        raise ValueError(
            f"teacher_model {name!r} has vocab_size {teacher} but the student has vocab_size {student}: the teacher "
            "must share the student's tokenizer and vocabulary (the same family, with the same padded embedding size)"
        )


def check_same_tokenizer(student: Any, teacher: Any | None, texts: list[str], name: str) -> None:
    """Refuse a teacher tokenizer (None: the teacher has none saved, nothing to compare) of another length, or that
    encodes one of `texts` (a sample of the training prompts) differently from the student's."""
    if teacher is None:
        logger.info("teacher_model %r has no tokenizer of its own: the vocabulary size alone was checked", name)
        return
    if len(teacher) != len(student):
        raise ValueError(
            f"teacher_model {name!r} has a tokenizer of {len(teacher)} tokens but the student's has {len(student)}: "
            "the teacher must share the student's tokenizer"
        )
    for index, text in enumerate(texts):
        ours = student(text, add_special_tokens=False)["input_ids"]
        theirs = teacher(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ValueError(
                f"teacher_model {name!r} tokenizes training text {index} ({text[:60]!r}) differently from the student "
                f"(first ids {theirs[:8]} vs {ours[:8]}): the teacher must share the student's tokenizer"
            )


def _teacher_tokenizer(name: str, trust_remote_code: bool) -> Any | None:
    """The tokenizer saved with the teacher, or None when there is none to load."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def sample_texts(dataset: Any, columns: tuple[str, ...], rows: int = 8) -> list[str]:
    """The text of the first `rows` rows of `dataset` in `columns` (plain strings, or the text of every message of a
    conversation), for the tokenizer check; an unreadable dataset gives none."""
    if dataset is None or isinstance(dataset, dict):
        return []
    texts: list[str] = []
    for row in itertools.islice(iter(dataset), rows):
        for column in columns:
            texts.extend(_texts(row.get(column)) if isinstance(row, dict) else [])
    return [text for text in texts if text]


def _texts(value: Any) -> list[str]:
    """The strings of a prompt: itself, or each message's text content (text blocks included)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    texts = []
    for message in value:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return texts


def _single_active_adapter(policy: nn.Module) -> str:
    """The name of the PEFT policy's one active adapter (the one training updates)."""
    active = policy.active_adapter
    if not isinstance(active, str):
        raise ValueError(f"a self-teacher needs a PEFT policy with one active adapter, not {active!r}")
    return active


def _is_identity_lora(policy: nn.Module, adapter: str) -> bool:
    """True when `adapter` is a LoRA (without DoRA) whose every layer adds zero: the policy is its base model. A linear
    layer's delta is zero when its B is; an embedding's when its A or its B is (PEFT starts embeddings at A = 0)."""
    config = policy.peft_config[adapter]
    if getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False):
        return False
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False  # those are full copies of modules, not a zero-init delta
    layers = _lora_factors(policy, adapter)
    if not layers:
        return False
    factors = [factor for layer in layers for factor in layer]
    local = [[t.to_local() if isinstance(t, DTensor) else t for t in factor] for factor in factors]
    nonzero = torch.tensor([float(sum(int(t.count_nonzero()) for t in factor)) for factor in local])
    nonzero = nonzero.to(local[0][0].device)  # the collective's device
    if _is_sharded(policy):  # each process sees its own shards
        torch.distributed.all_reduce(nonzero)
    zero_factors = torch.split(nonzero == 0, [len(factors) for factors in layers])
    return all(bool(zero.any()) for zero in zero_factors)


def _lora_factors(policy: nn.Module, adapter: str) -> list[list[list[torch.Tensor]]]:
    """Per LoRA layer of `adapter`, the factors (each a list of tensors) of which any one being all zero makes the
    layer's delta zero: [B] for a linear / conv layer (its bias, if any, is B's), [A, B] for an embedding."""
    layers = []
    for module in policy.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and adapter in lora_b:
            layers.append([[p.detach() for p in lora_b[adapter].parameters()]])
        embedding_a, embedding_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
        if isinstance(embedding_a, nn.ParameterDict) and adapter in embedding_a:
            layers.append([[embedding_a[adapter].detach()], [embedding_b[adapter].detach()]])
    return layers


def _add_frozen_adapter_copy(policy: nn.Module, source: str, target: str) -> None:
    """Add adapter `target` to the PEFT policy as a frozen copy (config and weights, same dtypes) of `source`, without
    dropout, leaving the active adapter, every existing parameter's trainable flag and `source`'s dropout as they were
    (it is added after TRL's `disable_dropout_in_model`, and the teacher scores while the policy is in train mode)."""
    trainable = {name: p.requires_grad for name, p in policy.named_parameters()}
    config = _without_dropout(copy.deepcopy(policy.peft_config[source]))
    config.inference_mode = True
    policy.add_adapter(target, config)
    _disable_adapter_dropout(policy, target)
    if policy.active_adapter != source:
        policy.set_adapter(source)
    for name, p in policy.named_parameters():
        p.requires_grad_(trainable.get(name, False))
    with torch.no_grad():
        for teacher, student in _adapter_pairs(policy, source, target):
            teacher.data = student.data.detach().clone()


def _adapter_pairs(policy: nn.Module, source: str, target: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(target, source) parameter pairs of two adapters of a PEFT model, matched by name."""
    params = dict(policy.named_parameters())
    pairs = []
    for name, p in _adapter_named_parameters(policy, source):
        twin = ".".join(target if part == source else part for part in name.split("."))
        if twin not in params:
            raise ValueError(f"adapter {target!r} has no parameter matching {name}")
        pairs.append((params[twin], p))
    return pairs


def _adapter_named_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter of a PEFT model. PEFT keys an adapter's weights by its name in a ModuleDict
    (`lora_A.<adapter>.weight`) or a ParameterDict (`lora_embedding_A.<adapter>`): one segment of the dotted name."""
    return [(name, p) for name, p in model.named_parameters() if adapter in name.split(".")]


def _without_dropout(config: Any) -> Any:
    """`config` (a PEFT adapter config) with every dropout rate set to 0 (`lora_dropout`, LoHa / LoKr's
    `rank_dropout` and `module_dropout`, ...): a teacher's scores must not be a random sample."""
    for field, value in list(vars(config).items()):
        if "dropout" in field and isinstance(value, float):
            setattr(config, field, 0.0)
    return config


def _disable_adapter_dropout(policy: nn.Module, adapter: str) -> None:
    """Zero every dropout module PEFT keyed by `adapter` (LoRA's `lora_dropout[adapter]`), whatever its config said."""
    for module in policy.modules():
        if isinstance(module, nn.ModuleDict) and adapter in module and isinstance(module[adapter], nn.Dropout):
            module[adapter].p = 0.0


@contextlib.contextmanager
def _adapter_active(model: nn.Module, adapter: str) -> Iterator[None]:
    """Activate `adapter` (frozen) for a forward; restore the previous adapter and every trainable flag after
    (PEFT's `set_adapter` marks the activated adapter trainable and the others frozen)."""
    previous = model.active_adapter
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in trainable:
            p.requires_grad_(flag)


def _refuse_zero3_copy(mode: str, policy: nn.Module) -> None:
    """A copy (of the model or of an adapter) made from ZeRO-3 partitioned parameters would hold empty shards."""
    if is_zero3_partitioned(policy):
        raise ValueError(
            f"teacher={mode!r} keeps a copy of the policy, but the policy's parameters are ZeRO-3 partitioned "
            "(a copy would hold empty shards); use teacher='live' (no copy), a fresh LoRA policy with "
            "teacher='initial' (the adapter disabled, no copy), or ZeRO-2 / FSDP2"
        )


def _is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a saved whole tensor) laid out like `param`: this process's shard of it when `param` is a DTensor
    (every process holds `full`, so no communication), else on `param`'s device, keeping `full`'s dtype."""
    if isinstance(param, DTensor):
        full = full.to(param.to_local().device)
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors: FSDP2 shards are gathered (a collective, the result on CPU and on
    rank 0 only); an unsharded model's own `state_dict()`."""
    if not _is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state_dict(model: nn.Module, path: str) -> None:
    """Load a whole-tensor state dict: into an FSDP2 model, rank 0 reads it and every rank keeps its own shard."""
    if not _is_sharded(model):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    first = torch.distributed.get_rank() == 0
    weights = torch.load(path, map_location="cpu", weights_only=True) if first else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


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


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters (`zero.Init` or `deepspeed.initialize`
    give each one `ds_id` / `ds_numel`, and leave its `.data` an empty shard holder)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in model.parameters())


def _fp32_linear(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`head`'s projection in float32, as TRL's `cast_lm_head_to_fp32` patches the policy's head (bound to `head`)."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(hidden_states.float(), head.weight.float(), bias)

    return forward


class TeacherSyncCallback(TrainerCallback):
    """Calls the teacher's `on_optimizer_step` at the end of every optimizer step (kinds that declare
    `follows_policy`)."""

    def __init__(self, trainer: object) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_teacher_step(state.global_step)
