"""The `rlsd` command line: `rlsd demo`, `rlsd train`, `rlsd eval`, `rlsd bench`, `rlsd model`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlsd.commands.parsing import actionable, command_line, one_line

SUBCOMMANDS = {
    "demo": "GRPO, RLSD and OPSD on the embedded task (--task vision: in images; --task agent: a tool to call), "
    "offline on a CPU (minutes).",
    "train": "Train a model with RLSDTrainer (TRL-style: --config recipe.yaml and flags).",
    "eval": "Evaluate a model on a dataset: pass@1, avg@n, pass@k, lengths.",
    "bench": "Benchmarks: `rlsd bench methods` and `rlsd bench cost`.",
    "model": "Convert a GGUF file (`rlsd model gguf FILE`, `rlsd model smollm2`) into a trainable model folder.",
}
TRANSFORMERS_DEBUG_OPTIONS = ("underflow_overflow", "tpu_metrics_debug")
"""Values of `TrainingArguments.debug`: after `--debug` they make it `rlsd train`'s flag, not rlsd's."""


def demo_parser() -> argparse.ArgumentParser:
    from rlsd.experiments.demo import DemoConfig
    from rlsd.experiments.methods import CATALOGUE
    from rlsd.infra.threads import thread_count

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="rlsd demo",
        description=SUBCOMMANDS["demo"],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help=f"comma-separated methods among {', '.join(name for name, o in CATALOGUE.items() if o is not None)}",
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="optimizer steps per method (--task vision: 80 unless given)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of data, sampling and warm start")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations")
    parser.add_argument(
        "--task", choices=("text", "vision", "agent", "video", "gui"), default="text",
        help="text: the arithmetic task as text; vision: the expression only in an image, a tiny Qwen2-VL; agent: a "
        "hidden value the model must look up with a tool before answering (GRPO, RLSD and SOD unless --methods); "
        "video: the expression one character per frame of a clip (GRPO, RLSD and VISD unless --methods); gui: "
        "click the named button on a synthetic screen (GRPO, RLSD and GUI-SD unless --methods)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="output folder (runs/demo, runs/vision-demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (CI): small model, few steps")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads", type=thread_count, default=None,
        help="torch threads (default: OMP_NUM_THREADS, else the cores available less those other work keeps busy)",
    )  # fmt: skip
    return command_line(parser)


def run_demo_command(argv: list[str]) -> int:
    import warnings

    from transformers.utils import logging as hf_logging

    from rlsd.experiments.demo import DemoConfig, quick_config, run_demo
    from rlsd.experiments.provenance import started_at

    started_at()  # a malformed $RLSD_STARTED_AT is refused before any work

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    print("rlsd demo: loading torch, transformers and TRL ...", flush=True)
    args = demo_parser().parse_args(argv)
    explicit = {a.split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}  # either spelling
    overrides = dict(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        steps=args.steps if "--steps" in explicit else None,
        eval_every=args.eval_every if "--eval-every" in explicit else None,
    )
    command = ["rlsd", "demo", *argv]
    if args.task in ("video", "agent", "gui"):  # their own default methods unless --methods is given
        overrides["methods"] = overrides["methods"] if "--methods" in explicit else None
    tasks = {"vision": run_vision_demo_command, "video": run_video_demo_command, "agent": run_agent_demo_command,
             "gui": run_gui_demo_command}  # fmt: skip
    if args.task in tasks:
        return tasks[args.task](args, overrides, command)
    if not args.quick:
        overrides.update(steps=args.steps, eval_every=args.eval_every)
    return run_task_demo(args, overrides, command, DemoConfig, quick_config, run_demo)


def run_vision_demo_command(args: argparse.Namespace, overrides: dict, command: list[str]) -> int:
    """`rlsd demo --task vision`: the same comparison on the image version of the task (its own step defaults)."""
    from rlsd.experiments.vision_task import VisionDemoConfig, run_vision_demo, vision_quick_config

    return run_task_demo(args, overrides, command, VisionDemoConfig, vision_quick_config, run_vision_demo)


def run_video_demo_command(args: argparse.Namespace, overrides: dict, command: list[str]) -> int:
    """`rlsd demo --task video`: GRPO, RLSD and VISD on the embedded video task (`rlsd.experiments.video_task`)."""
    from rlsd.experiments.video_task import VideoDemoConfig, run_video_demo, video_quick_config

    return run_task_demo(args, overrides, command, VideoDemoConfig, video_quick_config, run_video_demo)


def run_agent_demo_command(args: argparse.Namespace, overrides: dict, command: list[str]) -> int:
    """`rlsd demo --task agent`: GRPO, RLSD and SOD on the embedded tool task (`rlsd.experiments.agent_task`)."""
    from rlsd.experiments.agent_task import AgentDemoConfig, agent_quick_config, run_agent_demo

    return run_task_demo(args, overrides, command, AgentDemoConfig, agent_quick_config, run_agent_demo)


def run_gui_demo_command(args: argparse.Namespace, overrides: dict, command: list[str]) -> int:
    """`rlsd demo --task gui`: GRPO, RLSD and GUI-SD on the embedded GUI task (`rlsd.experiments.gui_demo`)."""
    from rlsd.experiments.gui_demo import GuiDemoConfig, gui_quick_config, run_gui_demo

    return run_task_demo(args, overrides, command, GuiDemoConfig, gui_quick_config, run_gui_demo)


def run_task_demo(
    args: argparse.Namespace, overrides: dict, command: list[str], config_class: type, quick: Callable, run: Callable
) -> int:
    """One task demo (text, vision, video, agent, gui): its default or quick config with the flags applied, run,
    timed and summarised."""
    from rlsd.experiments.demo import with_overrides
    from rlsd.experiments.provenance import record_run

    out = args.out or config_class().out
    base = quick(out, seed=args.seed) if args.quick else config_class(out=out, seed=args.seed)
    config = with_overrides(base, **overrides)
    started = time.perf_counter()
    summary = run(config, progress=not args.no_progress, threads=args.threads)
    record_run(config.out, command, time.perf_counter() - started)
    print_summary(summary, config.out)
    return 0


def print_summary(summary: dict, out: Path) -> None:
    """The end-of-run table."""
    print(f"\nwarm start: {summary['warm_start_seconds']:.0f} s; total: {summary['total_seconds']:.0f} s")
    header = f"{'method':<10} {'initial':>8} {'final':>8} {'peak':>8} {'leakage':>8} {'s/step':>7}"
    print(header)
    print("-" * len(header))
    for method, s in summary["methods"].items():
        print(
            f"{method:<10} {100 * s['initial_pass_at_1']:>7.1f}% {100 * s['final_pass_at_1']:>7.1f}% "
            f"{100 * s['peak_pass_at_1']:>7.1f}% {100 * s['final_leakage_rate']:>7.1f}% {s['seconds_per_step']:>7.2f}"
        )
    print(f"\nwrote {out}/metrics.jsonl, summary.json, curves.png, report.html")


def main(argv: list[str] | None = None) -> int:
    """`rlsd SUBCOMMAND ...`: an error a person can act on (`rlsd.commands.parsing.actionable`) prints one line,
    its message and fix, to stderr and returns 2; with `--debug` anywhere on the line it propagates with its
    traceback, as every other exception (a bug) does."""
    argv, debug = without_debug(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] == "--version":
        from rlsd import __version__

        print(f"rlsd {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlsd {" + ",".join(SUBCOMMANDS) + "} [options]\n")
        for name, text in SUBCOMMANDS.items():
            print(f"  {name:<6} {text}")
        print("\n`rlsd SUBCOMMAND --help` lists every option with its default; `rlsd --version` the version.")
        print("An error you can fix prints one line and exits with status 2; `--debug` shows its traceback.")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"rlsd: unknown subcommand {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        return run_subcommand(command, rest)
    except Exception as err:
        if debug or not actionable(err):
            raise
        print(f"rlsd {command}: {one_line(str(err))}", file=sys.stderr)
        return 2


def without_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without rlsd's `--debug` (anywhere on the line) and whether it was there. `--debug` followed by one of
    transformers' debug options (`rlsd train --debug underflow_overflow`) is left to `rlsd train`."""
    kept: list[str] = []
    debug = False
    for index, arg in enumerate(argv):
        if arg == "--debug" and (index + 1 == len(argv) or argv[index + 1] not in TRANSFORMERS_DEBUG_OPTIONS):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def run_subcommand(command: str, rest: list[str]) -> int:
    """Run one subcommand; its errors reach `main`."""
    if command == "demo":
        return run_demo_command(rest)
    if command == "train":
        from rlsd.commands.train import main as train_main

        return train_main(rest)
    if command == "eval":
        from rlsd.commands.evaluate import main as eval_main

        return eval_main(rest)
    if command == "bench":
        from rlsd.experiments.bench import main as bench_main

        return bench_main(rest)
    if command == "model":
        from rlsd.commands.convert import main as model_main

        return model_main(rest)
    raise AssertionError(f"unhandled subcommand {command!r}")


if __name__ == "__main__":
    sys.exit(main())
