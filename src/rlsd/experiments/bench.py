"""`rlsd bench methods`, `cost`, `study` and `report`: the evidence behind BENCHMARKS.md.

`methods` trains every method (the baselines, or any member of the self-distillation family) over several seeds
from one warm start on the embedded task, with the demo's protocol, and writes per-seed curves, `curves.png`
(mean and spread) and a table. `cost` measures seconds per
optimizer step and peak memory of GRPO, RLSD (live / synced / initial teacher) and the peers (`sdpo`: TRL's
SDPOTrainer; `trl-distill`: TRL's DistillationTrainer) on the same model, data and batch, each configuration in its
own process, and splits RLSD's step into generation, teacher pass and the rest (scoring and update).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rlsd.commands.parsing import command_line
from rlsd.experiments import localisation
from rlsd.experiments.demo import (
    DemoConfig,
    budget_kwargs,
    evaluate_heldout,
    jsonable,
    quick_config,
    trainer_args,
)
from rlsd.experiments.evidence import mean_interval, render_documents
from rlsd.experiments.methods import BENCH_METHODS, CATALOGUE, COST_CONFIGS, FAMILY_METHODS, STUDY_CONFIGS, check_known
from rlsd.experiments.orchestrated import ORCHESTRATED, train_bench_method
from rlsd.experiments.provenance import provenance, record_run
from rlsd.experiments.regimes import add_regime_options, apply_regime
from rlsd.experiments.tables import TEACHER_SHARE_FLOOR, render_cost_table, render_study_table
from rlsd.experiments.task import accuracy_reward, evaluation_problems, make_rl_dataset
from rlsd.experiments.warmstart import load_warm_start, warm_start
from rlsd.infra.validate import ConfigError, check_positive


# ----------------------------------------------------------------------------------------------- methods
def sdpo_builder(config: DemoConfig):
    """A factory for TRL's experimental SDPOTrainer with the demo's budget (the peer for SDPO)."""
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    def build(model, tokenizer, train_dataset, callbacks):
        args = SDPOConfig(**budget_kwargs(config, "sdpo"))
        return SDPOTrainer(
            model,
            accuracy_reward,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    return build


def distillation_builder(config: DemoConfig):
    """A factory for TRL's stable DistillationTrainer on `opd-jsd`'s configuration (on-policy generalized JSD with
    beta 0.5 from the same external teacher, the same completions per step, length, steps and learning rate)."""
    from trl import DistillationConfig, DistillationTrainer

    opd = trainer_args(config, "opd-jsd")
    fields = set(DistillationConfig.__dataclass_fields__)
    budget = {k: v for k, v in budget_kwargs(config, "trl-distill").items() if k in fields}

    def build(model, tokenizer, train_dataset, callbacks):
        args = DistillationConfig(**budget, beta=opd.distill_jsd_beta, disable_dropout=True)
        return DistillationTrainer(
            model,
            teacher_model=opd.teacher_model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    return build


def uses_external_teacher(config: DemoConfig, methods: tuple[str, ...]) -> bool:
    """Whether any of `methods` distils from the demo's external teacher (its own held-out score is then recorded)."""
    return "trl-distill" in methods or any(
        {**(CATALOGUE.get(m) or {}), **config.method_overrides.get(m, {})}.get("teacher") == "external"
        and "teacher_model" not in config.method_overrides.get(m, {})
        for m in methods
    )


PEERS = {"sdpo": sdpo_builder, "trl-distill": distillation_builder}
"""The methods another library trains: a factory of the peer's trainer from the demo config."""


def run_methods(
    config: DemoConfig,
    methods: tuple[str, ...],
    seeds: list[int],
    progress: bool,
    resume: bool = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Every (method, seed) from the same warm start; returns per-run summaries and writes the files. With `resume`,
    runs already complete in the output folder (final evaluation written) are kept and not trained again. Each run
    trained here records its provenance (commit, CPU, threads, `command`, default `sys.argv`)."""
    made_by = provenance(command or sys.argv)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    kept, runs = _completed_runs(out, config.steps) if resume else ([], {})
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    warm_path = warm_start(config.warm, progress=progress)
    eval_problems = evaluation_problems(config.warm.task, config.eval_size, config.eval_set)
    (out / "problems.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "prompt": p.prompt, "answer": p.answer}) + "\n" for i, p in enumerate(eval_problems)
        )
    )

    def record(row: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if uses_external_teacher(config, methods) and not any(r.get("kind") == "teacher_eval" for r in kept):
        teacher, tokenizer = load_warm_start(warm_start(config.external_teacher(), progress=progress))
        record(
            {
                "kind": "teacher_eval",
                **evaluate_heldout(teacher, tokenizer, eval_problems, config.max_completion_length),
            }
        )
    for seed in seeds:
        for method in methods:
            if f"{method}/{seed}" in runs:
                continue
            seeded = replace(config, seed=seed)
            summary = train_bench_method(method, seeded, warm_path, eval_problems, record, progress, PEERS)
            runs[f"{method}/{seed}"] = {**summary, "provenance": made_by}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    wanted = {f"{method}/{seed}" for method in methods for seed in seeds}
    rows = [r for r in rows if f"{r.get('method')}/{r.get('seed')}" in wanted]
    runs = {key: value for key, value in runs.items() if key in wanted}
    table = methods_table(rows, methods, config.steps)
    result = {"config": jsonable(asdict(config)), "seeds": seeds, "runs": runs, "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(render_methods_table(table))
    plot_methods(rows, methods, out / "curves.png")
    return result


def _completed_runs(out: Path, steps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The metric rows and summaries of the runs in `out` that reached their final evaluation at `steps`."""
    metrics_path, results_path = out / "metrics.jsonl", out / "results.json"
    if not metrics_path.exists() or not results_path.exists():
        return [], {}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    finished = {(r["method"], r["seed"]) for r in rows if r["kind"] == "eval" and r["step"] == steps}
    summaries = json.loads(results_path.read_text())["runs"]
    done = {f"{m}/{s}" for m, s in finished} & set(summaries)
    kept = [r for r in rows if f"{r.get('method')}/{r.get('seed')}" in done]
    return kept, {key: summaries[key] for key in done}


def methods_table(rows: list[dict[str, Any]], methods: tuple[str, ...], steps: int) -> dict[str, dict[str, Any]]:
    """Per method, over seeds: final pass@1 mean and std, peak and its step, the first step at which the mean
    curve reaches GRPO's final mean, final leakage, entropy and length."""
    curves = {m: _mean_curve(rows, m, "pass_at_1") for m in methods}
    grpo_final = curves["grpo"][-1][1] if curves.get("grpo") else None
    table = {}
    for method in methods:
        finals = _finals(rows, method, "pass_at_1")
        if not finals:
            continue
        curve = curves[method]
        peak_step, peak = max(curve, key=lambda point: point[1])
        reach = next((step for step, value in curve if grpo_final is not None and value >= grpo_final), None)
        train = [r for r in rows if r.get("method") == method and r["kind"] == "train" and r["step"] > steps * 0.8]
        table[method] = {
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "peak_mean": peak,
            "peak_step": peak_step,
            "reaches_grpo_final_at": reach,
            "final_leakage": statistics.mean(_finals(rows, method, "leakage_rate")),
            "final_length": statistics.mean(_finals(rows, method, "mean_length")),
            "entropy_last20pct": _mean_of(train, "entropy"),
            "clip_low_frac": _mean_of(train, "rlsd/clip_low_frac"),
            "clip_high_frac": _mean_of(train, "rlsd/clip_high_frac"),
            "seeds": len(finals),
        }
    return table


def _finals(rows: list[dict[str, Any]], method: str, key: str) -> list[float]:
    """The last evaluation's `key` of each seed."""
    last: dict[int, tuple[int, float]] = {}
    for r in rows:
        if r.get("method") == method and r["kind"] == "eval" and r["step"] >= last.get(r["seed"], (-1, 0.0))[0]:
            last[r["seed"]] = (r["step"], r[key])
    return [value for _, value in last.values()]


def _mean_curve(rows: list[dict[str, Any]], method: str, key: str) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r.get("method") == method and r["kind"] == "eval":
            by_step.setdefault(r["step"], []).append(r[key])
    return [(step, statistics.mean(values)) for step, values in sorted(by_step.items())]


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def render_methods_table(table: dict[str, dict[str, Any]]) -> str:
    """Markdown: pass@1 in %, mean ± std over seeds."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = [
        "| method | final pass@1 | peak pass@1 (step) | reaches GRPO final at | final leakage | entropy | length |"
        " clip low / high |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, t in table.items():
        clip = f"{pct(t['clip_low_frac'])} / {pct(t['clip_high_frac'])}" if t["clip_low_frac"] is not None else "n/a"
        entropy = "n/a" if t["entropy_last20pct"] is None else f"{t['entropy_last20pct']:.3f}"
        reach = "never" if t["reaches_grpo_final_at"] is None else f"step {t['reaches_grpo_final_at']}"
        lines.append(
            f"| {method} | {pct(t['final_mean'])} ± {pct(t['final_std'])} | {pct(t['peak_mean'])} "
            f"({t['peak_step']}) | {reach} | {pct(t['final_leakage'])} | {entropy} | {t['final_length']:.1f} "
            f"| {clip} |"
        )
    return "\n".join(lines) + "\n"


def plot_methods(rows: list[dict[str, Any]], methods: tuple[str, ...], path: Path) -> None:
    """Mean pass@1 and leakage over seeds with a min-max band, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlsd.experiments.report import method_colors, save_pass_and_leakage

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = method_colors(list(methods))
    for method in methods:
        for ax, key in zip(axes, ("pass_at_1", "leakage_rate"), strict=True):
            by_step: dict[int, list[float]] = {}
            for r in rows:
                if r.get("method") == method and r["kind"] == "eval":
                    by_step.setdefault(r["step"], []).append(100 * r[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [statistics.mean(by_step[s]) for s in steps]
            color = colors[method]
            ax.plot(steps, mean, label=method, color=color)
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.15,
                            color=color)  # fmt: skip
    save_pass_and_leakage(fig, axes, path, "Held-out pass@1 (greedy), mean and min-max over seeds")


# ------------------------------------------------------------------------------------------------- study
def run_study(
    config: DemoConfig,
    names: list[str],
    seeds: list[int],
    progress: bool,
    resume: bool = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Every knob and GRPO on the same seeds; the metric is the mean held-out pass@1 over the evaluations of
    the second half of the run, compared with GRPO seed by seed (paired differences, 95% t interval)."""
    result = run_methods(config, tuple(names), seeds, progress, resume=resume, command=command)
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    result["study"] = study_table(rows, names, seeds, config.steps)
    (config.out / "results.json").write_text(json.dumps(result, indent=2))
    (config.out / "study.md").write_text(render_study_table(result["study"]))
    return result


def second_half_score(rows: list[dict[str, Any]], method: str, seed: int, steps: int) -> float:
    """Mean pass@1 of one run over its evaluations at steps >= steps / 2."""
    values = [
        r["pass_at_1"]
        for r in rows
        if r.get("method") == method and r.get("seed") == seed and r["kind"] == "eval" and r["step"] >= steps / 2
    ]
    if not values:
        raise ValueError(f"no evaluation of {method} seed {seed} in the second half of the run")
    return statistics.mean(values)


def study_table(rows: list[dict[str, Any]], names: list[str], seeds: list[int], steps: int) -> dict[str, Any]:
    """Per knob: mean score, and the paired difference to GRPO with its 95% interval."""
    base = {seed: second_half_score(rows, "grpo", seed, steps) for seed in seeds}
    table = {}
    for name in names:
        scores = [second_half_score(rows, name, seed, steps) for seed in seeds]
        diffs = [score - base[seed] for score, seed in zip(scores, seeds, strict=True)]
        mean, low, high = mean_interval(diffs) if len(seeds) > 1 else (statistics.mean(diffs), math.nan, math.nan)
        table[name] = {
            "score_mean": statistics.mean(scores),
            "diff_mean": mean,
            "diff_ci95": [low, high],
            "scores": scores,
        }
    return table


# -------------------------------------------------------------------------------------------------- cost
def cost_trainer(name: str, config: DemoConfig, model, tokenizer, dataset):
    """The trainer `cost_once` times for `name`: the peer's own trainer from `PEERS` (as `run_methods` trains it),
    else an `RLSDTrainer` with lam held constant so that every measured step pays the full cost."""
    from rlsd.trainer import RLSDTrainer

    if name in PEERS:
        return PEERS[name](config)(model, tokenizer, dataset, [])
    args = trainer_args(replace(config, method_overrides={name: {"rlsd_lambda_decay_steps": 0}}), name)
    return RLSDTrainer(model, accuracy_reward, args=args, train_dataset=dataset, processing_class=tokenizer)


def cost_once(name: str, config: DemoConfig, steps: int, warmup: int) -> dict[str, Any]:
    """One configuration in this process: per-step seconds, the split of RLSD's step, peak RSS, and the class of
    the trainer timed (a peer's teacher pass, as DistillationTrainer's, is not split out: it falls in "rest")."""
    import torch
    from transformers.trainer_callback import PrinterCallback, TrainerCallback

    torch.manual_seed(config.seed)
    model, tokenizer = load_warm_start(warm_start(config.warm, progress=False))
    dataset = make_rl_dataset(config.warm.task, 512, seed=config.seed)
    total = steps + warmup
    trainer = cost_trainer(name, replace(config, steps=total), model, tokenizer, dataset)
    trainer.remove_callback(PrinterCallback)
    # the teacher's share of a step: its prompt (rendering, tokenization), the rollout-time pass of the credit rules
    # and the loss-time pass of the distillation losses
    teacher_parts = ("teacher_inputs", "teacher_rows", "teacher_hidden")
    timers: dict[str, list[float]] = {"generation": [], "context": [], **{part: [] for part in teacher_parts}}
    _time_method(trainer, "_generate", timers["generation"])
    if hasattr(trainer, "scorer"):  # an RLSDTrainer: its teacher prompts, then its scorer's two teacher passes
        _time_method(trainer.prompts, "build", timers["teacher_inputs"])
        for part in teacher_parts[1:]:
            _time_method(trainer.scorer, part, timers[part])
        if hasattr(trainer.source, "generate"):  # a generated context's writer, inside the teacher prompts' time
            _time_method(trainer.source, "generate", timers["context"])

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    measured = slice(warmup, total)
    step = timer.seconds[measured]

    def per_step(seconds: list[float]) -> list[float]:
        """The seconds of each measured optimizer step (one micro-batch per step here): a pass called k times per
        step (RLCSD's K + 1 teacher passes, a draft harness's two generations) is summed over its k calls; zeros when
        never called."""
        k = len(seconds) // total
        if k == 0:
            return [0.0] * len(step)
        return [sum(seconds[i * k : (i + 1) * k]) for i in range(total)][measured]

    generation = per_step(timers["generation"])
    teacher = [sum(parts) for parts in zip(*(per_step(timers[part]) for part in teacher_parts), strict=True)]
    calls = timers["context"]
    context = {"context_s_median": statistics.median(per_step(calls))} if calls else {}
    return {
        "name": name,
        "trainer": type(trainer).__name__,
        "step_s_median": statistics.median(step),
        "step_s_all": step,
        "generation_s_median": statistics.median(generation),
        "teacher_s_median": statistics.median(teacher),
        "rest_s_median": statistics.median([s - g - t for s, g, t in zip(step, generation, teacher, strict=True)]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **context,
    }


def _time_method(obj: Any, name: str, sink: list[float]) -> None:
    """Instrument `obj.name` to append its wall time to `sink` (benchmark-only instrumentation; set on the instance,
    a frozen dataclass such as `Scorer` included)."""
    original = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    object.__setattr__(obj, name, timed)


def run_cost(
    config: DemoConfig, names: list[str], steps: int, warmup: int, repeats: int, quick: bool
) -> dict[str, Any]:
    """Each configuration in a fresh process (clean peak memory), interleaved `repeats` times; medians and
    ratios to GRPO from the same invocation."""
    warm_start(config.warm, progress=False)
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:
            command = [sys.executable, "-m", "rlsd.experiments.bench", "_cost_once", name, str(steps), str(warmup)]
            command += ["--quick"] if quick else []
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"cost run {name} failed:\n{result.stderr[-3000:]}")
            samples[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    summary = {}
    for name, runs in samples.items():
        summary[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in (
                "step_s_median",
                "generation_s_median",
                "teacher_s_median",
                "rest_s_median",
                "peak_rss_mib",
                "context_s_median",
            )
            if key in runs[0]
        }
        summary[name]["trainer"] = runs[0]["trainer"]  # the class timed under this name
    base = summary.get("grpo")
    if base:
        for row in summary.values():
            row["step_ratio_to_grpo"] = row["step_s_median"] / base["step_s_median"]
            row["memory_ratio_to_grpo"] = row["peak_rss_mib"] / base["peak_rss_mib"]
            extra = row["step_s_median"] - base["step_s_median"]
            meaningful = row["teacher_s_median"] >= TEACHER_SHARE_FLOOR * row["step_s_median"]
            row["extra_over_teacher"] = extra / row["teacher_s_median"] if meaningful else None
    return {"config": jsonable(asdict(config)), "steps": steps, "warmup": warmup, "repeats": repeats,
            "results": summary, "samples": samples}  # fmt: skip


# ------------------------------------------------------------------------------------------------ command
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsd bench", description="Benchmarks behind BENCHMARKS.md.")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="method comparison over seeds on the embedded task",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    family = ", ".join(FAMILY_METHODS)
    methods.add_argument("--methods", default=",".join(BENCH_METHODS), help=f"comma-separated; family: {family}")
    methods.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    methods.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the demo's)")
    methods.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    methods.add_argument("--out", type=Path, default=None, help=OUT_HELP.format(command="methods"))
    methods.add_argument("--quick", action="store_true", help="smoke run (CI): tiny model, few steps")
    methods.add_argument("--no-progress", action="store_true", help="hide progress bars")
    methods.add_argument("--resume", action="store_true", help="keep the runs already complete in --out")
    methods.add_argument("--greedy-only", action="store_true", help=_GREEDY_ONLY)
    add_regime_options(methods)
    cost = sub.add_parser("cost", help="seconds per step and peak memory against GRPO",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    cost.add_argument("--configs", default=",".join(COST_CONFIGS), help="comma-separated configurations")
    cost.add_argument("--steps", type=int, default=5, help="measured optimizer steps per run")
    cost.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    cost.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every configuration")
    cost.add_argument("--out", type=Path, default=None, help=OUT_HELP.format(command="cost"))
    cost.add_argument("--quick", action="store_true", help="smoke run (CI): tiny model")
    study = sub.add_parser("study", help="knobs of RLSD against GRPO over paired seeds",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    study.add_argument("--configs", default=",".join(STUDY_CONFIGS), help="comma-separated knobs (grpo included)")
    study.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    study.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the demo's)")
    study.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: the demo's)")
    study.add_argument("--out", type=Path, default=None, help=OUT_HELP.format(command="study"))
    study.add_argument("--quick", action="store_true", help="smoke run (CI): tiny model, few steps")
    study.add_argument("--no-progress", action="store_true", help="hide progress bars")
    study.add_argument("--resume", action="store_true", help="keep the runs already complete in --out")
    study.add_argument("--greedy-only", action="store_true", help=_GREEDY_ONLY)
    add_regime_options(study)
    localisation.add_parser(sub)
    report = sub.add_parser("report", help="render every table of BENCHMARKS.md and README.md from benchmarks/")
    report.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document differs")
    report.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    once = sub.add_parser("_cost_once")  # internal: one configuration in a fresh process
    once.add_argument("name")
    once.add_argument("steps", type=int)
    once.add_argument("warmup", type=int)
    once.add_argument("--quick", action="store_true")
    return command_line(parser)


OUT_HELP = "output folder (default: benchmarks/{command}, the committed evidence; --quick: runs/bench-{command}-quick)"


def output_folder(args: argparse.Namespace) -> Path:
    """--out, else `runs/bench-COMMAND-quick` for a quick run (a smoke run never writes over the committed
    `benchmarks/` folders, which the documents' tables are rendered from), else `benchmarks/COMMAND`."""
    if args.out is not None:
        return args.out
    return Path(f"runs/bench-{args.command}-quick") if args.quick else Path("benchmarks") / args.command


_GREEDY_ONLY = "skip sampled pass@k and the teacher diagnostics (training is unchanged: they use a forked RNG)"


def _greedy_only(config: DemoConfig) -> DemoConfig:
    """Only the greedy evaluations: a run's training and greedy curve stay identical to a full run's."""
    return replace(config, sample_k=0, diagnostics_size=0)


def _base_config(quick: bool, out: Path) -> DemoConfig:
    return quick_config(out) if quick else DemoConfig(out=out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    command = ["rlsd", "bench", *argv]
    if args.command == "_cost_once":
        print(json.dumps(cost_once(args.name, _base_config(args.quick, Path("runs/bench-cost")), args.steps,
                                   args.warmup)))  # fmt: skip
        return 0
    if args.command == "report":
        differing = render_documents(args.root, check=args.check)
        verb = "differ from the raw files" if args.check else "re-rendered"
        print(f"{len(differing)} table(s) {verb}: {', '.join(differing) or 'none'}")
        return 1 if args.check and differing else 0
    if args.command == "localisation":
        return localisation.run_command(args, _base_config(args.quick, Path("runs/bench-localisation")), command)
    out = output_folder(args)
    if args.command in ("methods", "study"):
        check_positive({"--seeds": args.seeds, "--steps": args.steps, "--eval-every": args.eval_every})
    else:
        check_positive({"--steps": args.steps, "--repeats": args.repeats})
    config = _base_config(args.quick, out)
    config = apply_regime(config, args) if args.command in ("methods", "study") else config
    if args.command == "methods":
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        try:
            check_known(methods)
        except ValueError as err:
            raise ConfigError("--methods", str(err)) from None
        config = replace(config, steps=args.steps or config.steps, eval_every=args.eval_every or config.eval_every)
        config = _greedy_only(config) if args.greedy_only else config
        started = time.perf_counter()
        seeds = list(range(args.seeds))
        progress = not args.no_progress
        result = run_methods(config, methods, seeds, progress=progress, resume=args.resume, command=command)
        record_run(out, command, time.perf_counter() - started)
        print(render_methods_table(result["table"]))
        print(f"wall time {time.perf_counter() - started:.0f} s; wrote {out}/")
        return 0
    if args.command == "study":
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in CATALOGUE or CATALOGUE[n] is None]
        if unknown or "grpo" not in names:
            raise ConfigError("--configs", f"must include grpo and come from {', '.join(STUDY_CONFIGS)}; got {names}")
        config = replace(config, steps=args.steps or config.steps, eval_every=args.eval_every or config.eval_every)
        config = _greedy_only(config) if args.greedy_only else config
        started = time.perf_counter()
        result = run_study(config, names, list(range(args.seeds)), progress=not args.no_progress, resume=args.resume,
                           command=command)  # fmt: skip
        record_run(out, command, time.perf_counter() - started)
        print(render_study_table(result["study"]))
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    try:
        check_known(names, tuple(m for m in CATALOGUE if m not in ORCHESTRATED))  # cost times one trainer's step
    except ValueError as err:
        raise ConfigError("--configs", str(err)) from None
    started = time.perf_counter()
    cost = run_cost(config, names, args.steps, args.warmup, args.repeats, args.quick)
    cost["wall_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    (out / "table.md").write_text(render_cost_table(cost))
    record_run(out, command, cost["wall_seconds"])
    print(render_cost_table(cost))
    print(f"wall time {cost['wall_seconds']:.0f} s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
