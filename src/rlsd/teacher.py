"""The privileged self-teacher's weights: which copy (if any) it keeps and when it follows the policy (section 2.3)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import add_fused_lm_head, use_adapter

from rlsd.config import TEACHER_MODES

TEACHER_WEIGHTS_FILE = "rlsd_teacher.pt"
TEACHER_STATE_FILE = "rlsd_teacher.json"
TEACHER_SHADOW_FILE = "rlsd_teacher_ema_shadow.pt"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model (duck-typed so that PEFT stays optional)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


class SelfTeacher:
    """Owns the teacher's weights for one training run.

    `synced`: a frozen copy, hard-copied from the policy after every `sync_steps` optimizer steps.
    `ema`: a copy updated after each optimizer step as decay * teacher + (1 - decay) * policy; bf16 / fp16
        parameters are averaged in an fp32 shadow (saved in checkpoints), so that small steps are not rounded away.
    `initial`: a copy that never changes; with a PEFT policy, no copy: the policy with its adapter disabled.
    `live`: no copy: the current policy weights.
    """

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
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher={mode!r} is not one of {', '.join(TEACHER_MODES)}")
        self.mode = mode
        self.sync_steps = sync_steps
        self.ema_decay = ema_decay
        self.last_sync_step = 0
        self.shadow: list[torch.Tensor | None] | None = None  # fp32 EMA of the low-precision teacher parameters
        self.uses_disabled_adapter = mode == "initial" and _is_peft_model(policy)
        self.model: nn.Module | None = None
        if mode in ("synced", "ema") or (mode == "initial" and not self.uses_disabled_adapter):
            if is_zero3_partitioned(policy):
                raise ValueError(
                    f"teacher={mode!r} keeps a copy of the policy, but the policy's parameters are ZeRO-3 partitioned "
                    "(a copy would hold empty shards); use teacher='live' (no copy), a PEFT policy with "
                    "teacher='initial' (the adapter disabled, no copy), or ZeRO-2 / FSDP2"
                )
            self.model = self._frozen_copy(policy, temperature, with_entropy, cast_lm_head_to_fp32)

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
        add_fused_lm_head(
            base,
            temperature=temperature,
            cast_lm_head_to_fp32=cast_lm_head_to_fp32,
            outputs=("log_probs", "entropy") if with_entropy else ("log_probs",),
        )
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    @contextlib.contextmanager
    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        """Yield the module that scores teacher sequences: the copy, or the policy (live / adapter disabled)."""
        if self.model is not None:
            yield self.model
        elif self.uses_disabled_adapter:
            with use_adapter(unwrapped_policy, adapter_name=None):
                yield policy
        else:
            yield policy

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """Follow the policy after optimizer step `global_step`; True when the teacher's weights changed."""
        if self.mode == "synced" and global_step - self.last_sync_step >= self.sync_steps:
            SyncRefModelCallback.sync_target_model(policy, self.model, alpha=1.0)
            self.last_sync_step = global_step
            return True
        if self.mode == "ema":
            self._ema_step(policy)
            self.last_sync_step = global_step
            return True
        return False

    @torch.no_grad()
    def _ema_step(self, policy: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * policy; a bf16 / fp16 parameter is averaged in its fp32 shadow
        and rounded into the teacher (in its own precision, updates below one ulp would round away)."""
        alpha = 1.0 - self.ema_decay
        if self.shadow is None:  # none under ZeRO-3, where TRL's update gathers the partitioned parameters
            partitioned = is_zero3_partitioned(self.model)
            self.shadow = [
                p.detach().float().clone() if p.dtype in LOW_PRECISION and not partitioned else None
                for p in self.model.parameters()
            ]
        if all(shadow is None for shadow in self.shadow):  # full precision: TRL's update, unchanged
            SyncRefModelCallback.sync_target_model(policy, self.model, alpha=alpha)
            return
        for target, source, shadow in zip(self.model.parameters(), policy.parameters(), self.shadow, strict=True):
            if shadow is None:
                target.data.mul_(1.0 - alpha).add_(source.data, alpha=alpha)
            else:
                shadow.mul_(1.0 - alpha).add_(source.data.float(), alpha=alpha)
                target.data.copy_(shadow)

    def save(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        """Write the teacher's weights (when it has its own) and its sync state into a checkpoint folder."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TEACHER_STATE_FILE), "w") as f:
            json.dump({"mode": self.mode, "last_sync_step": self.last_sync_step}, f)
        if self.model is not None:
            torch.save(unwrap(self.model).state_dict(), os.path.join(directory, TEACHER_WEIGHTS_FILE))
        if self.shadow is not None:
            torch.save(self.shadow, os.path.join(directory, TEACHER_SHADOW_FILE))

    def load(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        """Restore what `save` wrote; a checkpoint from another teacher mode is refused."""
        state_path = os.path.join(directory, TEACHER_STATE_FILE)
        if not os.path.exists(state_path):
            raise FileNotFoundError(f"checkpoint {directory} has no {TEACHER_STATE_FILE}: it was not written by RLSD")
        with open(state_path) as f:
            state = json.load(f)
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} differs from teacher={self.mode!r}")
        self.last_sync_step = int(state["last_sync_step"])
        if self.model is not None:
            weights = torch.load(os.path.join(directory, TEACHER_WEIGHTS_FILE), map_location="cpu", weights_only=True)
            unwrap(self.model).load_state_dict(weights)
        shadow_path = os.path.join(directory, TEACHER_SHADOW_FILE)
        self.shadow = None  # without a saved shadow, the next EMA step starts one from the restored weights
        if os.path.exists(shadow_path):
            shadow = torch.load(shadow_path, map_location="cpu", weights_only=True)
            params = list(self.model.parameters())
            self.shadow = [None if s is None else s.to(p.device) for s, p in zip(shadow, params, strict=True)]


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
    """Calls `SelfTeacher.on_optimizer_step` at the end of every optimizer step."""

    def __init__(self, trainer: object) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_teacher_step(state.global_step)
