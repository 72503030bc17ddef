"""NPO / AutoNPO's guide (Near-Future Policy Optimization, arXiv 2604.20733): the teacher kind `"near_future"`.

The paper's guide is a later checkpoint of the same run: it trains ahead Delta steps, rolls back, and trains again
from the earlier point with the later checkpoint's verified-correct rollouts in the hard groups. One run on one
machine does this online (a reconstruction of the paper's offline restart): at an anchor step the policy's weights and
the optimizer's state are kept, training goes on `npo_lookahead` steps (the lookahead), the weights reached become the
guide, and the policy and optimizer are rolled back to the anchor; then `npo_guide_steps` guided steps follow
(`rlsd.step.near_future` replaces the slots). The global step, the learning-rate schedule and the data order go on
(the lookahead's steps are spent, not replayed). AutoNPO keeps every lookahead checkpoint (Delta = 1..lookahead) and
the collaborator picks the one with the largest S = Q / V on the mistake pool (`choose_lookahead`).

Its state (phase, histories, the anchor's weights and optimizer state, the candidates, the guide) goes into
checkpoints through the teacher's files (`TEACHER_STATE_FILE`, `TEACHER_WEIGHTS_FILE`), as every teacher's does."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rlsd.core.rules import Knob
from rlsd.teachers.base import TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE, TeacherBuild, read_teacher_state, teacher_kind

NPO_TRIGGERS = ("none", "step", "auto")
"""`npo_trigger`: off; NPO's manual intervention at `npo_start_step`; AutoNPO's trigger (`npo_should_trigger`)."""
NEAR_FUTURE = "near_future"
STATE_KEYS = ("phase", "anchor_step", "steps_left", "lookahead", "rewards", "entropies")
"""The guide's attributes kept in the JSON part of its checkpoint state (`NearFutureTeacher.state` / `load`)."""


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    """A knob check: the value is one of `choices`."""
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def _at_least(low: float) -> Callable[[Any], str | None]:
    """A knob check: the value is a number >= `low`."""
    return lambda value: None if isinstance(value, int | float) and value >= low else f"must be >= {low}, got {value}"


def _unit(value: Any) -> str | None:
    """A knob check: the value lies in [0, 1]."""
    return None if isinstance(value, int | float) and 0.0 <= value <= 1.0 else f"must lie in [0, 1], got {value!r}"


NPO_KNOBS: dict[str, Knob] = {
    "npo_trigger": Knob(
        "none",
        "NPO / AutoNPO (arXiv 2604.20733, needs teacher='near_future'): 'none' (off), 'step' "
        "(one intervention anchored after step npo_start_step) or 'auto' (AutoNPO: anchored when the "
        "reward stagnates or the entropy collapses).",
        _choice(NPO_TRIGGERS),
    ),
    "npo_start_step": Knob(1, "NPO ('step'): the optimizer step after which the anchor is kept.", _at_least(1)),
    "npo_lookahead": Knob(
        2,
        "NPO: Delta, the steps trained ahead of the anchor before rolling back (AutoNPO: the "
        "largest Delta it may choose).",
        _at_least(1),
    ),
    "npo_guide_steps": Knob(4, "NPO: guided steps after each rollback.", _at_least(1)),
    "npo_slots": Knob(
        1, "NPO: slots of each hard group replaced by verified-correct guide rollouts (the paper: one).", _at_least(1)
    ),
    "npo_guide_samples": Knob(
        4,
        "NPO: guide rollouts sampled per hard group; the first npo_slots verified ones fill its slots.",
        _at_least(1),
    ),
    "npo_max_group_accuracy": Knob(
        0.0, "NPO: a group is hard when at most this fraction of its completions succeed (0: all fail).", _unit
    ),
    "npo_success_reward": Knob(1.0, "NPO: a completion whose total reward reaches this is verified correct.", None),
    "npo_window": Knob(2, "AutoNPO: steps per window of the reward / entropy trigger.", _at_least(1)),
    "npo_min_reward_gain": Knob(
        0.01,
        "AutoNPO: reward stagnation when the last window's mean reward gains less than this over the window before.",
        None,
    ),
    "npo_entropy_ratio": Knob(
        0.5,
        "AutoNPO: entropy collapse when the last window's mean entropy falls below this "
        "fraction of the first window's.",
        _unit,
    ),
}
"""NPO's knobs, `RLSDConfig` fields (`rlsd.config`)."""


def npo_should_trigger(
    rewards: list[float], entropies: list[float], *, window: int, min_gain: float, entropy_ratio: float
) -> str | None:
    """AutoNPO's trigger over per-step histories (reconstruction: the paper names the signals, not these formulas):
    "stagnation" when the mean reward of the last `window` steps gains less than `min_gain` over the `window` before,
    "entropy" when the last window's mean entropy is below `entropy_ratio` times the first window's; None before two
    full windows."""
    if len(rewards) < 2 * window:
        return None
    last, before = rewards[-window:], rewards[-2 * window : -window]
    if sum(last) / window - sum(before) / window < min_gain:
        return "stagnation"
    if len(entropies) >= 2 * window:
        first, recent = sum(entropies[:window]) / window, sum(entropies[-window:]) / window
        if recent < entropy_ratio * first:
            return "entropy"
    return None


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict."""
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


@teacher_kind(NEAR_FUTURE, follows_policy=True)
class NearFutureTeacher:
    """The near-future guide and the intervention's state machine: "wait" (histories, trigger), "ahead" (training
    past the anchor, candidates kept), "choose" (AutoNPO picks a candidate at the next rollout), "guide" (the guide
    fills hard groups' slots for `npo_guide_steps` steps), then "wait" again ('auto') or "done" ('step')."""

    mode: str = NEAR_FUTURE

    def __init__(self, policy: nn.Module, args: Any) -> None:
        self.model: nn.Module | None = copy.deepcopy(policy).eval().requires_grad_(False)
        self.args = args
        self.phase, self.anchor_step, self.steps_left, self.lookahead = "wait", 0, 0, 0
        self.rewards: list[float] = []
        self.entropies: list[float] = []
        self.anchor: dict[str, Any] | None = None  # the policy's weights and the optimizer's state at the anchor
        self.candidates: dict[int, dict[str, torch.Tensor]] = {}  # Delta -> weights reached Delta steps ahead
        self.mistakes: list[tuple[Any, Any]] = []  # (input row, prompt) of recent hard groups: AutoNPO's pool
        self.choice_stats: dict[int, tuple[float, float]] = {}  # AutoNPO's last (Q, V) by Delta
        self.optimizer: Any = None

    @classmethod
    def from_build(cls, build: TeacherBuild) -> NearFutureTeacher:
        """A guide copied from the policy; a run that NPO cannot serve is refused naming the field."""
        args = build.args
        if getattr(args, "npo_trigger", "none") == "none":
            raise ValueError("teacher='near_future' is NPO's guide: set npo_trigger to 'step' or 'auto'")
        refused = (("beta", args.beta != 0.0), ("use_vllm", args.use_vllm), ("teacher_offload", args.teacher_offload))
        for name, bad in refused:
            if bad:
                raise ValueError(f"NPO replaces rollouts after TRL scored them and generates with its own guide: "
                                 f"{name}={getattr(args, name)!r} is not supported (beta=0.0, use_vllm=False and "
                                 "teacher_offload=False)")  # fmt: skip
        if args.npo_slots >= args.num_generations:
            raise ValueError(f"npo_slots={args.npo_slots} must be below num_generations={args.num_generations}")
        if args.distributed_state.num_processes > 1:
            raise ValueError("NPO's rollback and slot replacement run on one process; launch one process")
        return cls(build.policy, args)

    @property
    def has_weights(self) -> bool:
        """Checkpoints carry the guide, the anchor and the candidates."""
        return True

    @contextmanager
    def forward_context(self, policy: nn.Module, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        """The guide itself (NPO scores nothing with it; generation uses `model`)."""
        yield self.model

    def bind_optimizer(self, optimizer: Any) -> None:
        """The run's optimizer, handed by `TeacherSyncCallback` before each `on_optimizer_step` (the rollback)."""
        self.optimizer = optimizer

    def observe(self, reward: float, entropy: float | None) -> None:
        """One training rollout's mean reward (and the policy's mean token entropy, AutoNPO) for the trigger."""
        self.rewards.append(float(reward))
        if entropy is not None:
            self.entropies.append(float(entropy))

    def trigger(self, global_step: int) -> str | None:
        """Why an anchor is kept after `global_step` (None: not now)."""
        args = self.args
        if args.npo_trigger == "step":
            return "step" if global_step == args.npo_start_step else None
        return npo_should_trigger(self.rewards, self.entropies, window=args.npo_window,
                                  min_gain=args.npo_min_reward_gain, entropy_ratio=args.npo_entropy_ratio)  # fmt: skip

    def on_optimizer_step(self, global_step: int, policy: nn.Module) -> bool:
        """Advance the state machine after optimizer step `global_step`; True when the guide's weights changed."""
        args = self.args
        if self.phase == "wait" and self.trigger(global_step) is not None:
            optimizer = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
            self.anchor = {"weights": _cpu_state(policy), "optimizer": optimizer}
            self.phase, self.anchor_step = "ahead", global_step
            return False
        if self.phase == "ahead":
            delta = global_step - self.anchor_step
            if args.npo_trigger == "auto" or delta == args.npo_lookahead:
                self.candidates[delta] = _cpu_state(policy)
            if delta < args.npo_lookahead:
                return False
            self.rollback(policy)
            if len(self.candidates) == 1:
                self.adopt(next(iter(self.candidates)))
                return True
            self.phase = "choose"
            return False
        if self.phase == "guide":
            self.steps_left -= 1
            if self.steps_left <= 0:
                self.phase = "wait" if args.npo_trigger == "auto" else "done"
                self.rewards, self.entropies, self.mistakes = [], [], []
        return False

    def rollback(self, policy: nn.Module) -> None:
        """Restore the policy's weights and the optimizer's state kept at the anchor."""
        policy.load_state_dict(self.anchor["weights"])
        if self.optimizer is not None and self.anchor["optimizer"] is not None:
            self.optimizer.load_state_dict(self.anchor["optimizer"])
        self.anchor = None

    def load_candidate(self, delta: int) -> None:
        """Put the candidate `delta` steps ahead into the guide's weights."""
        self.model.load_state_dict(self.candidates[delta])

    def adopt(self, delta: int) -> None:
        """Make the candidate `delta` steps ahead the guide for the next `npo_guide_steps` steps."""
        self.load_candidate(delta)
        self.lookahead, self.candidates = delta, {}
        self.phase, self.steps_left = "guide", self.args.npo_guide_steps

    def follow(self, policy: nn.Module) -> None:
        """A resume without the guide's state: start over from the policy, waiting for a trigger."""
        self.model.load_state_dict(policy.state_dict())
        self.phase, self.anchor, self.candidates = "wait", None, {}

    def state(self) -> dict[str, Any]:
        """The JSON part of the checkpoint state."""
        return {"mode": self.mode, **{key: getattr(self, key) for key in STATE_KEYS}}

    def save(self, directory: str, unwrap: Callable[[nn.Module], nn.Module], *, write: bool = True) -> None:
        """Write the state (json) and the guide, anchor, candidates and mistake pool (`TEACHER_WEIGHTS_FILE`)."""
        if not write:
            return
        with open(os.path.join(directory, TEACHER_STATE_FILE), "w") as f:
            json.dump(self.state(), f)
        weights = {"guide": _cpu_state(unwrap(self.model)), "anchor": self.anchor, "candidates": self.candidates,
                   "mistakes": self.mistakes}  # fmt: skip
        torch.save(weights, os.path.join(directory, TEACHER_WEIGHTS_FILE))

    def load(self, directory: str, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        """Restore what `save` wrote."""
        state = read_teacher_state(directory, self.mode)
        for key in STATE_KEYS:
            setattr(self, key, state[key])
        weights = torch.load(os.path.join(directory, TEACHER_WEIGHTS_FILE), map_location="cpu", weights_only=False)
        unwrap(self.model).load_state_dict(weights["guide"])
        self.anchor, self.candidates, self.mistakes = weights["anchor"], weights["candidates"], weights["mistakes"]
