"""CoPD's pure parts (Co-Evolving Policy Distillation, arXiv 2604.27083): which branch trains on which domain at
which of its steps (`copd_schedule`), and the final merge of the branches' weights (`average_states`).

The paper's full text was not available when this was built: the round layout below (every branch's RL phase, then
every branch's distillation phase, the distillation phase's steps split over the other branches in cyclic order,
teachers frozen at the end of the round's RL phase) and the uniform parameter average are reconstructions from its
abstract and public summaries (parallel branches from one base, alternating branch-specific RLVR with mutual
on-policy distillation, "simple parameter merging" after training). The paper's hub-and-spoke topology for more than
two branches is not built: every branch is taught by every other one in turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

RL, DISTILL = "rl", "distill"
"""A segment's phase: the branch's own GRPO on its domain, or on-policy distillation from another branch."""


@dataclass(frozen=True)
class Segment:
    """A run of `steps` optimizer steps of one branch: `branch` trains on domain `domain`'s prompts from its step
    `start` to `end`; in a distillation segment `domain` is also the teaching branch (each domain's expert)."""

    round: int
    phase: str
    branch: int
    domain: int
    start: int
    steps: int

    @property
    def end(self) -> int:
        """The branch's optimizer steps once the segment is done."""
        return self.start + self.steps

    @property
    def teacher(self) -> int | None:
        """The branch that teaches this segment (None in an RL segment)."""
        return self.domain if self.phase == DISTILL else None


def _split(total: int, parts: int) -> list[int]:
    """`total` steps over `parts` blocks, the first `total % parts` blocks one step longer."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def copd_schedule(num_branches: int, max_steps: int, rl_steps: int, distill_steps: int) -> list[Segment]:
    """Every segment of a CoPD run in the order it is trained: rounds of `rl_steps` GRPO steps of each branch on its
    own domain, then `distill_steps` steps of each branch k split into contiguous blocks taught by the other branches
    j = k+1, k+2, ... (mod K) on j's domain, until each branch has `max_steps` steps (the last round cut short)."""
    checks = {"number of branches (domains)": (num_branches, 2), "max_steps": (max_steps, 1),
              "copd_rl_steps": (rl_steps, 1), "copd_distill_steps": (distill_steps, 0)}  # fmt: skip
    for name, (value, low) in checks.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f"CoPD needs {name} >= {low}, got {value!r}")
    segments: list[Segment] = []
    done, round_ = 0, 0
    while done < max_steps:
        rl = min(rl_steps, max_steps - done)
        segments += [Segment(round_, RL, k, k, done, rl) for k in range(num_branches)]
        done += rl
        distill = min(distill_steps, max_steps - done)
        for k in range(num_branches):
            start = done
            for offset, steps in enumerate(_split(distill, num_branches - 1), start=1):
                if steps:
                    segments.append(Segment(round_, DISTILL, k, (k + offset) % num_branches, start, steps))
                    start += steps
        done += distill
        round_ += 1
    return segments


def average_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform parameter average of the branches' state dicts (CoPD's merge), computed in float64 and cast back
    to each tensor's dtype; non-float entries (integer buffers) must be equal. Branches whose parameter names,
    shapes or dtypes differ are refused naming the branch and the parameter."""
    if not states:
        raise ValueError("CoPD's merge needs at least one branch's weights")
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise ValueError(f"cannot merge branch {index} with branch 0: different architectures (missing "
                             f"{missing[:3]}, unexpected {extra[:3]})")  # fmt: skip
        for name, tensor in first.items():
            other = state[name]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ValueError(f"cannot merge branch {index} with branch 0: parameter {name!r} is "
                                 f"{tuple(other.shape)} {other.dtype} there, {tuple(tensor.shape)} {tensor.dtype} in "
                                 "branch 0 (different architectures)")  # fmt: skip
    merged = {}
    for name, tensor in first.items():
        if torch.is_floating_point(tensor):
            total = sum(state[name].detach().to("cpu", torch.float64) for state in states)
            merged[name] = (total / len(states)).to(tensor.dtype)
            continue
        for index, state in enumerate(states[1:], start=1):
            if not torch.equal(state[name].cpu(), tensor.cpu()):
                raise ValueError(f"cannot merge branch {index} with branch 0: non-float entry {name!r} differs")
        merged[name] = tensor.detach().cpu().clone()
    return merged
