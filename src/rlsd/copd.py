"""CoPD (Co-Evolving Policy Distillation, arXiv 2604.27083): K branches of one base policy, each with its own domain,
trained in rounds of their own GRPO then mutual on-policy distillation, and merged at the end.

`CoPDTrainer` runs the schedule of `rlsd.core.co_evolving.copd_schedule` in one process, one branch at a time: each
segment (a run of one branch's steps in one phase) is an `RLSDTrainer` resumed from the branch's last checkpoint, so
every branch keeps its own weights, optimizer, scheduler, RNG and data position across segments through the trainer's
own checkpoints (`<output_dir>/branch-k/checkpoint-N`). A distillation segment of branch k on domain j is the
project's OPD: `teacher="external"` with the teaching branch j's weights as `teacher_model`, the plain prompt
(`privileged_source="none"`), no policy gradient (`policy_loss_coef=0`) and a per-token distillation loss
(`copd_distill_loss`, by default the full-vocabulary reverse KL: `jsd` at beta 1) on k's own samples. Teachers are
the branches' weights at the end of the round's RL phase, copied to `<output_dir>/teachers/`, so that stepping the
branches one after another equals stepping them in parallel. After the last segment the branches' weights are
averaged (`average_states`) into `<output_dir>/merged`.

Reconstructions (the paper's full text was not available): the round layout, the teachers frozen per phase, the
reverse-KL default, the uniform average, and one seed per branch (`seed + k`). `train(resume_from_checkpoint=True)`
continues a stopped run from its files: segments whose checkpoint exists are skipped, a segment cut short (killed, or
preempted by SIGTERM, which saves mid-segment) restarts from the branch's last checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from rlsd.config import RLSDConfig
from rlsd.core.co_evolving import DISTILL, RL, Segment, average_states, copd_schedule
from rlsd.core.distill import get_distill_loss
from rlsd.infra.checkpoint import write_json_atomically
from rlsd.plan import Stages
from rlsd.trainer import RLSDTrainer

COPD_STATE_FILE = "copd_state.json"
"""The run's domains and schedule, checked when resuming."""
TEACHERS_DIR, MERGED_DIR = "teachers", "merged"
_NOT_MODEL_FILES = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin",
                    "rlsd_*")  # fmt: skip
"""What a teacher snapshot leaves out of a branch's checkpoint: the training state, not the model."""


@dataclass
class CoPDConfig:
    r"""
    Configuration for [`CoPDTrainer`], beside the `RLSDConfig` every branch trains with (its `max_steps` is each
    branch's number of optimizer steps).

    Parameters:
        copd_rl_steps (`int`, *optional*, defaults to `4`):
            Optimizer steps of each branch's own GRPO on its domain at the start of every round.
        copd_distill_steps (`int`, *optional*, defaults to `2`):
            Optimizer steps of each branch's on-policy distillation after the RL phase of every round, split over the
            other branches in turn: branch k samples on domain j's prompts and is taught per token by branch j.
        copd_distill_loss (`str`, *optional*, defaults to `"jsd"`):
            The per-token distillation loss of the distillation phase (`rlsd.core.distill`'s registry).
        copd_distill_jsd_beta (`float`, *optional*, defaults to `1.0`):
            beta of the `jsd` / `topk_jsd` losses in the distillation phase: 1 is the reverse KL(p_S || p_T) of
            on-policy distillation.
    """

    copd_rl_steps: int = field(default=4, metadata={"help": "Each branch's own GRPO steps per round."})
    copd_distill_steps: int = field(
        default=2, metadata={"help": "Each branch's distillation steps per round, taught by the others in turn."}
    )
    copd_distill_loss: str = field(default="jsd", metadata={"help": "Per-token loss of the distillation phase."})
    copd_distill_jsd_beta: float = field(
        default=1.0, metadata={"help": "beta of jsd / topk_jsd in the distillation phase (1: reverse KL)."}
    )

    def __post_init__(self) -> None:
        get_distill_loss(self.copd_distill_loss)  # an unknown loss is refused naming the registered ones
        if not 0.0 <= self.copd_distill_jsd_beta <= 1.0:
            raise ValueError(f"copd_distill_jsd_beta must lie in [0, 1], got {self.copd_distill_jsd_beta}")


class CoPDTrainer:
    """K co-evolving branches (one per domain of `domains`, K >= 2) from one base `model`; `train` runs every
    segment and returns the merged policy (also `self.model`).

    `callbacks` (transformers `TrainerCallback`s) see the run as CoPD's phases: `on_step_begin` / `on_step_end` at
    the start and end of each phase of every branch (`state.global_step`: each branch's steps so far; the `model`
    handed to `on_step_end` is the average of the branches at that point) and every branch's `on_log`, its logs
    tagged with `copd/branch`, `copd/round` and `copd/distill`."""

    teacher = None
    """No teacher of its own: each distillation segment's `RLSDTrainer` holds the teaching branch."""

    def __init__(
        self,
        model: nn.Module,
        reward_funcs: Any,
        args: RLSDConfig,
        domains: Mapping[str, Any],
        processing_class: Any,
        copd: CoPDConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CoPDTrainer needs the base model as a module, got {type(model).__name__}")
        if len(domains) < 2:
            raise ValueError(f"CoPD needs at least 2 domains (one branch each), got {len(domains)}: {list(domains)}")
        for name, dataset in domains.items():
            if dataset is None or len(dataset) == 0:
                raise ValueError(f"CoPD domain {name!r} has an empty dataset: every branch needs its domain's prompts")
        if Stages(args, row_subsets=True).needs().teacher:
            raise ValueError(f"CoPD's RL phase runs without a teacher; credit={args.credit!r} with "
                             f"teacher={args.teacher!r} needs one (use credit='grpo')")  # fmt: skip
        self.copd = copd or CoPDConfig()
        self.schedule = copd_schedule(len(domains), args.max_steps, self.copd.copd_rl_steps,
                                      self.copd.copd_distill_steps)  # fmt: skip
        self.base, self.reward_funcs, self.args = model, reward_funcs, args
        self.domain_names, self.datasets = list(domains), list(domains.values())
        self.processing_class = processing_class
        self.callbacks: list[TrainerCallback] = list(callbacks or [])
        self.model: nn.Module | None = None
        self.segment: Segment | None = None  # the segment training now
        self._last: RLSDTrainer | None = None

    # ------------------------------------------------------------------------------------------------ callbacks
    def add_callback(self, callback: TrainerCallback) -> None:
        """Add a callback (an instance) that sees the run's phases and logs."""
        self.callbacks.append(callback)

    def remove_callback(self, callback: TrainerCallback | type) -> None:
        """Remove a callback, or every callback of a class; absent ones are ignored."""
        kind = callback if isinstance(callback, type) else None
        self.callbacks = [cb for cb in self.callbacks if cb is not callback and not (kind and isinstance(cb, kind))]

    @property
    def accelerator(self) -> Any:
        """The accelerator of the latest segment's trainer (its `unwrap_model` leaves the merged policy as is)."""
        if self._last is None:
            raise RuntimeError("CoPDTrainer has no accelerator before train() ran a segment")
        return self._last.accelerator

    # -------------------------------------------------------------------------------------------------- folders
    def branch_dir(self, branch: int) -> str:
        """Branch `branch`'s run folder: its `checkpoint-N` folders."""
        return os.path.join(self.args.output_dir, f"branch-{branch}")

    def teacher_dir(self, round_: int, branch: int) -> str:
        """The copy of branch `branch`'s weights at the end of round `round_`'s RL phase (its teacher snapshot)."""
        return os.path.join(self.args.output_dir, TEACHERS_DIR, f"round-{round_}", f"branch-{branch}")

    def latest_step(self, branch: int) -> int:
        """The step of branch `branch`'s latest checkpoint (0: none yet)."""
        folder = self.branch_dir(branch)
        last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        return int(last.rsplit("-", 1)[1]) if last else 0

    # --------------------------------------------------------------------------------------------------- segments
    def segment_args(self, segment: Segment) -> RLSDConfig:
        """The `RLSDConfig` of one segment: the run's arguments in the branch's folder, up to the segment's last
        step, saving there (and only there); a distillation segment is OPD from the teaching branch's snapshot."""
        changes: dict[str, Any] = dict(
            output_dir=self.branch_dir(segment.branch), max_steps=segment.end, seed=self.args.seed + segment.branch,
            save_strategy="steps", save_steps=segment.end, save_total_limit=2, generation_batch_size=None,
        )  # fmt: skip
        if segment.phase == DISTILL:
            changes.update(
                credit="grpo", policy_loss_coef=0.0, teacher="external", privileged_source="none",
                teacher_template="{prompt}", teacher_model=self.teacher_dir(segment.round, segment.domain),
                distill_loss=self.copd.copd_distill_loss, distill_jsd_beta=self.copd.copd_distill_jsd_beta,
                resume_weights_only=True,  # an RL checkpoint has no teacher state to restore: the snapshot is new
            )  # fmt: skip
        return dataclasses.replace(self.args, **changes)

    def train(self, resume_from_checkpoint: bool = False) -> nn.Module:
        """Every segment of the schedule, then the merge; with `resume_from_checkpoint`, the run in `output_dir`
        continues (its domains and schedule must be this run's)."""
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {"domains": self.domain_names, "schedule": [dataclasses.asdict(s) for s in self.schedule]}
        state_path = out / COPD_STATE_FILE
        if resume_from_checkpoint:
            if not state_path.exists():
                raise FileNotFoundError(f"cannot resume CoPD: {state_path} is missing (no run to continue in {out})")
            if json.loads(state_path.read_text()) != state:
                raise ValueError(f"cannot resume CoPD from {out}: {state_path} holds other domains or another "
                                 f"schedule than this run's (domains {self.domain_names})")  # fmt: skip
        else:
            self._clear(out)
            write_json_atomically(str(state_path), state)
        for index, segment in enumerate(self.schedule):
            if self.latest_step(segment.branch) >= segment.end:
                continue
            if segment.phase == DISTILL:
                self._snapshot_teachers(segment.round)
            if index == 0 or _phase(self.schedule[index - 1]) != _phase(segment):
                self._notify("on_step_begin", segment.start)
            self._run(segment)
            if index + 1 == len(self.schedule) or _phase(self.schedule[index + 1]) != _phase(segment):
                self._notify("on_step_end", segment.end, model=self.merge() if self.callbacks else None)
        self.model = self.merge()
        self.model.save_pretrained(out / MERGED_DIR)
        self.processing_class.save_pretrained(out / MERGED_DIR)
        return self.model

    def _run(self, segment: Segment) -> None:
        """Train one segment: a fresh copy of the base, resumed from the branch's latest checkpoint."""
        latest = self.latest_step(segment.branch)
        trainer = RLSDTrainer(
            copy.deepcopy(self.base), self.reward_funcs, args=self.segment_args(segment),
            train_dataset=self.datasets[segment.domain], processing_class=self.processing_class,
            callbacks=[_ForwardLogs(self, segment)],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        self._last, self.segment = trainer, segment
        checkpoint = os.path.join(self.branch_dir(segment.branch), f"{PREFIX_CHECKPOINT_DIR}-{latest}")
        trainer.train(resume_from_checkpoint=checkpoint if latest else None)
        self.segment = None

    def _snapshot_teachers(self, round_: int) -> None:
        """Copy each branch's weights at the end of round `round_`'s RL phase to its teacher folder (once; earlier
        rounds' copies are removed)."""
        rl_end = next(s.end for s in self.schedule if s.round == round_ and s.phase == RL)
        for branch in range(len(self.datasets)):
            target = self.teacher_dir(round_, branch)
            if os.path.isdir(target):
                continue
            source = os.path.join(self.branch_dir(branch), f"{PREFIX_CHECKPOINT_DIR}-{rl_end}")
            partial = target + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*_NOT_MODEL_FILES))
            os.replace(partial, target)
        for old in Path(self.args.output_dir, TEACHERS_DIR).glob("round-*"):
            if old.name != f"round-{round_}":
                shutil.rmtree(old)

    def branch_states(self) -> list[dict[str, Any]]:
        """Every branch's weights at its latest checkpoint (the base's where it has none), as state dicts."""
        states = []
        for branch in range(len(self.datasets)):
            step = self.latest_step(branch)
            folder = os.path.join(self.branch_dir(branch), f"{PREFIX_CHECKPOINT_DIR}-{step}")
            states.append(type(self.base).from_pretrained(folder).state_dict() if step else self.base.state_dict())
        return states

    def merge(self) -> nn.Module:
        """The base model holding the average of the branches' latest weights (`branch_states`)."""
        merged = copy.deepcopy(self.base)
        merged.load_state_dict(average_states(self.branch_states()))
        return merged

    def _notify(self, event: str, step: int, **kwargs: Any) -> None:
        """Call `event` on every callback with CoPD's phase position as the trainer state."""
        state = TrainerState(global_step=step, max_steps=self.args.max_steps)
        for callback in self.callbacks:
            getattr(callback, event)(self.args, state, TrainerControl(), **kwargs)

    def _clear(self, out: Path) -> None:
        """Remove what an earlier CoPD run left in `out` (only CoPD's own files and folders)."""
        for path in [*out.glob("branch-*"), out / TEACHERS_DIR, out / MERGED_DIR, out / COPD_STATE_FILE]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _phase(segment: Segment) -> tuple[int, str]:
    """The (round, phase) a segment belongs to."""
    return segment.round, segment.phase


class _ForwardLogs(TrainerCallback):
    """Hands a segment trainer's logs to the CoPD run's callbacks, tagged with the branch, round and phase."""

    def __init__(self, run: CoPDTrainer, segment: Segment) -> None:
        self.run, self.segment = run, segment

    def on_log(self, args, state, control, logs=None, **kwargs):
        tags = {"copd/branch": self.segment.branch, "copd/round": self.segment.round,
                "copd/distill": float(self.segment.phase == DISTILL)}  # fmt: skip
        for callback in self.run.callbacks:
            callback.on_log(args, state, control, logs={**(logs or {}), **tags}, **kwargs)
