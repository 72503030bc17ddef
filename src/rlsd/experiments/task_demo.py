"""The one runner of the embedded task demos (`rlsd demo --task vision | agent | gui | ...`): every method trained from
the same cached warm start under the same budget, evaluated as it goes, then summary.json, curves.png and report.html
(with the task's token-credit viewer).

A task plugs in what differs as a `TaskDemo` (its warm start, evaluation, reward, credit viewer, report additions),
built from its config by the task's module; the loop over methods, the timing, the metrics file, the summary and the
report are here. A task's config is a dataclass with `methods`, `steps`, `seed`, `eval_every`, `out` and `budget()`
(the text demo's `DemoConfig` carrying the shared budget, for `trainer_args`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rlsd.experiments.demo import DemoConfig, _Bar, _EvalAndTiming, jsonable, run_summary, trainer_args
from rlsd.experiments.warmstart import is_cached
from rlsd.infra.progress import Phases, ticking
from rlsd.infra.threads import pick_threads, torch_threads

Record = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class TaskDemo:
    """What one task plugs into `run_task_demo`; built from the task's config by its module."""

    task: str  # the summary's `task` and the phase lines' name ("vision")
    warm_namespace: str  # the warm start's cache folder ("vision-warmstart"), to say whether it is cached
    warm_config: Any  # the warm start's configuration (its hash names the cache entry)
    warm_steps: int  # its supervised steps, for the phase line
    warm_start: Callable[[bool], Path]  # (progress) -> the cached warm start's folder, trained on first use
    load: Callable[[Path], tuple[Any, Any]]  # folder -> (model, processing class)
    dataset: Callable[[], Any]  # the training rows
    evaluate: Callable[[Any, Any], dict[str, Any]]  # (policy, processing class) -> an evaluation row (`pass_at_1`...)
    evaluation: str  # what `evaluate` runs, for the phase lines ("greedy pass@1 on 200 problems")
    reward: Callable[..., list[float]]  # the reward function, TRL's signature
    viewer: Callable[[Any], dict[str, Any]]  # trainer -> the credit viewer's examples (`write_report`'s)
    viewer_from: Callable[[str, Any, dict[str, Any]], bool]  # (method, trainer, viewer so far) -> build it here?
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # more `RLSDTrainer` arguments (environment_factory)
    method_summary: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None  # more summary fields from evals
    finish_report: Callable[[Path, dict[str, Any]], None] | None = None  # (report.html, viewer): task additions


def run_task_demo(config: Any, demo: TaskDemo, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method of `config` from the task's warm start; write metrics.jsonl, summary.json, curves.png and
    report.html. Threads and phase lines as in the text demo (`rlsd.experiments.demo.run_demo`)."""
    phase = Phases()
    count, line = pick_threads(threads)
    phase(line)
    with torch_threads(count):
        return _run(config, demo, progress, phase, count)


def _run(config: Any, demo: TaskDemo, progress: bool, phase: Callable[[str], None], threads: int) -> dict[str, Any]:
    from rlsd.experiments.report import write_report

    config.out.mkdir(parents=True, exist_ok=True)
    metrics_path = config.out / "metrics.jsonl"
    metrics_path.write_text("")
    start = time.perf_counter()
    cached = is_cached(demo.warm_namespace, demo.warm_config)
    phase(f"{demo.task} warm start: " + ("loading it from the cache" if cached else
          f"{demo.warm_steps} supervised steps (once: cached for later runs)"))  # fmt: skip
    warm_path = demo.warm_start(progress)
    warm_seconds = time.perf_counter() - start

    def record(row: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    summary: dict[str, Any] = {"task": demo.task, "config": jsonable(asdict(config)), "threads": threads,
                               "warm_start_seconds": warm_seconds, "methods": {}}  # fmt: skip
    viewer: dict[str, Any] = {}
    for method in config.methods:
        trainer, summary["methods"][method] = train_task_method(method, config, demo, warm_path, record, progress,
                                                                phase)  # fmt: skip
        if demo.viewer_from(method, trainer, viewer):
            phase(f"credit viewer: sampling completions of {method}'s policy")
            viewer = demo.viewer(trainer)
    summary["total_seconds"] = time.perf_counter() - start
    phase(f"report: writing summary.json, curves.png and report.html to {config.out}")
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    write_report(config.out, rows, summary, viewer)
    if demo.finish_report is not None:
        demo.finish_report(config.out / "report.html", viewer)
    return summary


def viewer_of(own: str, methods: tuple[str, ...]) -> Callable[[str, Any, dict[str, Any]], bool]:
    """`TaskDemo.viewer_from` of a task with its own method: the credit viewer of `own`'s policy, else RLSD's, else
    the last method's."""

    def viewer_from(method: str, trainer: Any, viewer: dict[str, Any]) -> bool:
        return method == own or (method == "rlsd" and own not in methods) or (not viewer and method == methods[-1])

    return viewer_from


def task_budget(config: Any, max_completion_length: int | None = None) -> DemoConfig:
    """The text demo's config carrying a task config's budget (a task config's `budget()`, for `trainer_args`); its
    `max_completion_length` unless one is given."""
    length = config.max_completion_length if max_completion_length is None else max_completion_length
    return DemoConfig(
        methods=config.methods, steps=config.steps, seed=config.seed, eval_every=config.eval_every,
        eval_size=config.eval_size, prompts_per_step=config.prompts_per_step, num_generations=config.num_generations,
        learning_rate=config.learning_rate, lambda_decay_steps=config.lambda_decay_steps,
        max_completion_length=length, train_size=config.train_size, out=config.out,
    )  # fmt: skip


def train_task_method(
    method: str,
    config: Any,
    demo: TaskDemo,
    warm_path: Path,
    record: Record,
    progress: bool = True,
    phase: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train one method from the warm start, evaluating as it goes (at step 0, every `eval_every` steps and at the
    end); returns the trainer and its summary (`phase(text)`, when given, is told as each phase begins)."""
    from rlsd.trainer import RLSDTrainer

    say = phase or (lambda text: None)
    name = f"{method} ({demo.task}, seed {config.seed})"
    say(f"{name}: loading the warm start, evaluating it ({demo.evaluation})")
    torch.manual_seed(config.seed)
    model, processing = demo.load(warm_path)
    dataset = demo.dataset()

    def evaluate(policy):
        return demo.evaluate(policy, processing)

    evals = [{"step": 0, **evaluate(model)}]
    record({"kind": "eval", "method": method, "seed": config.seed, **evals[0]})

    def on_record(row: dict[str, Any]) -> None:
        if row["kind"] == "eval":
            evals.append(row)
        record({"method": method, "seed": config.seed, **row})

    callback = _EvalAndTiming(evaluate, config.eval_every, on_record)
    trainer = RLSDTrainer(
        model, demo.reward, args=trainer_args(config.budget(), method), train_dataset=dataset,
        processing_class=processing, callbacks=[callback], **demo.trainer_kwargs,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    say(f"{name}: training, {config.steps} steps, {demo.evaluation.split(' on ')[0]} every {config.eval_every} steps")
    began = time.perf_counter()
    with tqdm(total=config.steps, desc=name, disable=not progress) as bar, ticking(bar):
        trainer.add_callback(_Bar(bar))
        trainer.train()
    summary = run_summary(evals, callback.step_seconds, time.perf_counter() - began)
    if demo.method_summary is not None:
        summary.update(demo.method_summary(evals))
    return trainer, summary
