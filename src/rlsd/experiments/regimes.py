"""The benchmarks' regimes by task name (`rlsd bench ... --task NAME`): the embedded task's named variant
(`rlsd.experiments.task.TASKS`) with the warm start and completion length it needs, on top of a demo config."""

from __future__ import annotations

import argparse
from dataclasses import replace

from rlsd.experiments.demo import DemoConfig
from rlsd.experiments.task import PILOT_SIZE, TASKS, task_by_name
from rlsd.infra.validate import check_positive

LONG_WARM_STEPS = 200
"""Supervised steps of the `long` regime's warm start (the default task's 450 did not fit: a step of 64 examples of
about 220 tokens costs about 2.4 s of one core, 8-15 s of wall time on the shared 2-core machine of issue 26)."""
LONG_COMPLETION_LENGTH = 144
"""Room for the longest `long` solution (about 120 tokens) and its answer."""


def regime_config(task: str, config: DemoConfig) -> DemoConfig:
    """`config` on the named task: "default" leaves it as it is; "long" (issue 26) trains its warm start on the long
    chains without the hint-citing targets (`hint_share=0`: no token-1 artifact) and with half of the teacher-format
    prompts showing the worked steps instead of the answer (`steps_share=0.5`: a teacher that can read intermediate
    values), and lets completions run to `LONG_COMPLETION_LENGTH` tokens. A quick (smoke) config keeps its small
    model and step counts."""
    chosen = task_by_name(task)
    if task == "default":
        return config
    quick = config.warm.hidden_size < 128
    warm = replace(config.warm, task=chosen, hint_share=0.0, steps_share=0.5,
                   steps=config.warm.steps if quick else LONG_WARM_STEPS)  # fmt: skip
    teacher = (
        replace(config.teacher_warm, task=chosen, hint_share=0.0, steps_share=0.5) if config.teacher_warm else None
    )
    length = config.max_completion_length if quick else LONG_COMPLETION_LENGTH
    return replace(config, warm=warm, teacher_warm=teacher, max_completion_length=length)


def add_regime_options(parser: argparse.ArgumentParser) -> None:
    """`--task` and `--prompts-per-step`, for every bench command that trains or samples from a warm start."""
    parser.add_argument("--task", default="default", choices=tuple(TASKS), help="the embedded task's named regime")
    parser.add_argument("--prompts-per-step", type=int, default=None,
                        help="prompts per optimizer step (None: the demo's 4)")  # fmt: skip
    parser.add_argument("--warm-seed", type=int, default=None, help="the warm start's seed (None: the demo's 0)")
    parser.add_argument("--eval-set", choices=("heldout", "pilot"), default=None,
                        help="the held-out set (None) or the disjoint pilot set (200 problems)")  # fmt: skip


def apply_regime(config: DemoConfig, args: argparse.Namespace) -> DemoConfig:
    """`config` on `--task`'s regime, with `--prompts-per-step` (a positive count), `--warm-seed` and `--eval-set`
    when given."""
    config = regime_config(args.task, config)
    if args.warm_seed is not None:
        config = replace(config, warm=replace(config.warm, seed=args.warm_seed))
    if getattr(args, "eval_set", None) == "pilot":  # the pilot set: a regime is chosen without the held-out set
        config = replace(config, eval_set="pilot", eval_size=min(config.eval_size, PILOT_SIZE))
    if args.prompts_per_step is not None:
        check_positive({"--prompts-per-step": args.prompts_per_step})
        config = replace(config, prompts_per_step=args.prompts_per_step)
    return config
