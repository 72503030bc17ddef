"""The self-teacher modes (`SelfTeacher`: synced, live, initial, EMA): which copy of the policy, if any, they keep
(a model copy or a PEFT adapter), when they follow it (section 2.3), and how checkpoints carry their weights."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import use_adapter

from rlsd.teachers.adapters import (
    _adapter_active,
    _adapter_named_parameters,
    _adapter_pairs,
    _add_frozen_adapter_copy,
    _is_identity_lora,
    _single_active_adapter,
)
from rlsd.teachers.base import (
    INITIAL_ADAPTER,
    LOW_PRECISION,
    TEACHER_ADAPTER,
    TEACHER_SHADOW_FILE,
    TEACHER_STATE_FILE,
    TEACHER_WEIGHTS_FILE,
    TRL_REF_ADAPTER,
    TeacherBuild,
    _fp32_linear,
    _install_teacher_head,
    _is_peft_model,
    get_teacher_kind,
    read_teacher_state,
    teacher_kind,
    teacher_modes,
)
from rlsd.teachers.offload import TeacherOffload, resident
from rlsd.teachers.sharding import (
    _full_state_dict,
    _full_tensor,
    _like,
    _load_full_state_dict,
    _refuse_zero3_copy,
    is_zero3_partitioned,
)


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
    offload: TeacherOffload | None = None  # set by `offload_teachers` (`teacher_offload`): the copy waits on the CPU

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
            with resident(self):
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
            with resident(self):
                SyncRefModelCallback.sync_target_model(policy, self.model, alpha=1.0)
            return
        for target, source in self.adapter_pairs(policy):
            target.data.copy_(source.data)

    @torch.no_grad()
    def _ema_step(self, policy: nn.Module) -> None:
        """`_ema_update` with the teacher's weights on the accelerator (`teacher_offload`)."""
        with resident(self):
            self._ema_update(policy)

    def _ema_update(self, policy: nn.Module) -> None:
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
