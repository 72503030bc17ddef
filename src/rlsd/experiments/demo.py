"""`rlsd demo`: GRPO, RLSD and OPSD from one warm start on the embedded task, with curves and a credit viewer.

Orchestration only: the task lives in `rlsd.experiments.task`, the warm start in `rlsd.experiments.warmstart`, the
method catalogue in `rlsd.experiments.methods`, training in `RLSDTrainer`, and the files in `rlsd.experiments.report`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl.trainer.utils import pad

from rlsd.config import RLSDConfig
from rlsd.core.credit import rlsd_advantages
from rlsd.experiments.heldout_citation import HeldoutCitations, heldout_citations
from rlsd.experiments.methods import CATALOGUE, check_known
from rlsd.experiments.task import (
    TEACHER_TEMPLATE,
    TaskConfig,
    accuracy_reward,
    evaluation_problems,
    greedy_metrics,
    make_rl_dataset,
    teacher_prompt,
)
from rlsd.experiments.warmstart import (
    WarmStartConfig,
    external_teacher_config,
    generate,
    is_cached,
    load_warm_start,
    warm_start,
)
from rlsd.infra.progress import Phases, ticking
from rlsd.infra.threads import pick_threads, torch_threads
from rlsd.step.scoring import score_tokens
from rlsd.trainer import RLSDTrainer


@dataclass
class DemoConfig:
    """One comparison: the same warm start, budget and seed for every method."""

    methods: tuple[str, ...] = ("grpo", "rlsd", "opsd")
    steps: int = 150
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 500  # the first `eval_size` problems of the fixed held-out set (at most 500)
    eval_set: str = "heldout"  # "pilot": a disjoint set, for choosing a regime without touching the held-out one
    sample_k: int = 8  # samples per problem (T = 1) for sampled pass@1 and pass@k at the start and end; 0 skips
    diagnostics_size: int = 200  # problems whose sampled completions score the self-teacher at start and end; 0 skips
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    lambda_decay_steps: int = 50  # RLSD's lam decays from 0.5 to 0 over this many steps (the paper's 50)
    max_completion_length: int = 48
    train_size: int = 2000
    out: Path = Path("runs/demo")
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra or variant methods
    teacher_warm: WarmStartConfig | None = None  # the external teacher's warm start (None: external_teacher_config)

    def __post_init__(self) -> None:
        check_known([m for m in self.methods if m not in self.method_overrides])
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")

    def external_teacher(self) -> WarmStartConfig:
        """The warm start of the larger frozen teacher that methods with `teacher="external"` distil from."""
        return self.teacher_warm or external_teacher_config(self.warm)


def quick_config(out: Path, seed: int = 0) -> DemoConfig:
    """A smoke run for CI: a small warm start and a few steps, every file still written."""
    warm = WarmStartConfig(
        task=TaskConfig(num_operands=3),
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        steps=30,
        batch_size=32,
        train_pool=2000,
    )
    return DemoConfig(
        steps=4,
        eval_every=2,
        eval_size=24,
        sample_k=2,
        diagnostics_size=8,
        lambda_decay_steps=4,
        train_size=64,
        max_completion_length=24,
        warmup_steps=0,
        out=out,
        warm=warm,
        teacher_warm=replace(warm, hidden_size=48, steps=40),
        seed=seed,
    )


class _EvalAndTiming(TrainerCallback):
    """Held-out pass@1 and leakage every `eval_every` steps; wall time of each optimizer step."""

    def __init__(self, evaluate, every: int, record) -> None:
        self.evaluate, self.every, self.record = evaluate, every, record
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record({"kind": "eval", "step": state.global_step, **self.evaluate(model)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.record({"kind": "train", "step": state.global_step, **logs})


def run_demo(config: DemoConfig, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method from the same warm start; write metrics.jsonl, summary.json, curves.png, report.html.

    Runs on `threads` torch threads (None: `OMP_NUM_THREADS`, else chosen from the cores available and the load on
    them, `rlsd.infra.threads`) and prints the count first, then a line as each phase begins; `progress` adds the
    bars, with their estimates, within each phase."""
    phase = Phases()
    count, line = pick_threads(threads)
    phase(line)
    with torch_threads(count):
        return _run_demo(config, progress, phase, count)


def _run_demo(config: DemoConfig, progress: bool, phase: Callable[[str], None], threads: int) -> dict[str, Any]:
    from rlsd.experiments.report import write_report

    config.out.mkdir(parents=True, exist_ok=True)
    metrics_path = config.out / "metrics.jsonl"
    metrics_path.write_text("")
    start = time.perf_counter()
    warm = config.warm
    if is_cached("warmstart", warm):
        phase("warm start: loading it from the cache")
    else:
        phase(f"warm start: {warm.steps} supervised steps of a model of hidden size {warm.hidden_size}, "
              f"{warm.num_layers} layers (once: cached for later runs)")  # fmt: skip
    warm_path = warm_start(config.warm, progress=progress)
    warm_seconds = time.perf_counter() - start
    eval_problems = evaluation_problems(config.warm.task, config.eval_size, config.eval_set)

    def record(row: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    summary: dict[str, Any] = {
        "config": jsonable(asdict(config)), "threads": threads, "warm_start_seconds": warm_seconds, "methods": {}
    }  # fmt: skip
    viewer: dict[str, Any] | None = None
    for method in config.methods:
        trainer, summary["methods"][method] = train_method(
            method, config, warm_path, eval_problems, record, progress=progress, phase=phase
        )
        if trainer.teacher is not None and (method == "rlsd" or viewer is None):  # the viewer shows a teacher
            phase(f"credit viewer: sampling {len(eval_problems)} completions of {method}'s policy")
            viewer = credit_examples(trainer, trainer.processing_class, eval_problems, config, progress=progress)
    summary["total_seconds"] = time.perf_counter() - start
    phase(f"report: writing summary.json, curves.png and report.html to {config.out}")
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(config.out, _read(metrics_path), summary, viewer)
    return summary


def train_method(
    method: str,
    config: DemoConfig,
    warm_path: Path,
    eval_problems: list,
    record: Callable[[dict[str, Any]], None],
    *,
    progress: bool = True,
    build_trainer: Callable[..., Any] | None = None,
    phase: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train one method from the warm start, evaluating as it goes; returns the trainer and its summary.

    `build_trainer(model, tokenizer, train_dataset, callbacks)` replaces `RLSDTrainer` (the benchmark's peers);
    `phase(text)`, when given, is told as each phase begins (`rlsd.infra.progress.Phases`).
    """
    say = phase or (lambda text: None)
    name = f"{method} (seed {config.seed})"
    say(f"{name}: loading the warm start and {config.train_size} training problems")
    torch.manual_seed(config.seed)
    model, tokenizer = load_warm_start(warm_path)
    train_dataset = make_rl_dataset(config.warm.task, config.train_size, seed=config.seed, split="train")
    overrides = {**(CATALOGUE.get(method) or {}), **config.method_overrides.get(method, {})}
    citations = heldout_citations(overrides, eval_problems)  # None unless the source is a generated one

    def evaluate(policy):
        return evaluate_heldout(policy, tokenizer, eval_problems, config.max_completion_length, progress=progress,
                                citations=citations)  # fmt: skip

    say(f"{name}: evaluating the warm start ({_evaluations(config, len(eval_problems))})")
    evals = [{"step": 0, **evaluate(model)}]
    record({"kind": "eval", "method": method, "seed": config.seed, **evals[0]})
    sampled = [_sampled_eval(model, tokenizer, eval_problems, config, 0, progress)] if config.sample_k else []
    diagnostics = (
        [teacher_diagnostics(model, tokenizer, eval_problems, config, 0, progress)] if config.diagnostics_size else []
    )

    def on_record(row: dict[str, Any]) -> None:
        if row["kind"] == "eval":
            evals.append(row)
        record({"method": method, "seed": config.seed, **row})

    callback = _EvalAndTiming(evaluate, config.eval_every, on_record)
    external = overrides.get("teacher") == "external" and "teacher_model" not in overrides
    if build_trainer is None and external and not is_cached("warmstart", config.external_teacher()):
        teacher = config.external_teacher()
        say(f"{name}: training the external teacher's warm start, {teacher.steps} steps of hidden size "
            f"{teacher.hidden_size} (once: cached for later runs)")  # fmt: skip
    if build_trainer is None:
        trainer = RLSDTrainer(
            model,
            accuracy_reward,
            args=trainer_args(config, method, progress=progress),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
    else:
        trainer = build_trainer(model, tokenizer, train_dataset, [callback])
    if citations is not None:
        citations.source = trainer.source
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    say(f"{name}: training, {config.steps} steps of {config.prompts_per_step} prompts x {config.num_generations} "
        f"completions, greedy pass@1 every {config.eval_every} steps")  # fmt: skip
    began = time.perf_counter()
    with tqdm(total=config.steps, desc=name, disable=not progress) as bar, ticking(bar):
        trainer.add_callback(_Bar(bar))
        trainer.train()
    if config.sample_k or config.diagnostics_size:
        say(f"{name}: final evaluation ({_evaluations(config, len(eval_problems), greedy=False)})")
    if config.sample_k:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        sampled.append(_sampled_eval(policy, tokenizer, eval_problems, config, config.steps, progress))
        for row in sampled:
            record({"kind": "sampled", "method": method, "seed": config.seed, **row})
    if config.diagnostics_size:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        diagnostics.append(teacher_diagnostics(policy, tokenizer, eval_problems, config, config.steps, progress))
        for row in diagnostics:
            record({"kind": "diagnostics", "method": method, "seed": config.seed, **row})
    return trainer, run_summary(evals, callback.step_seconds, time.perf_counter() - began)


def _evaluations(config: DemoConfig, problems: int, greedy: bool = True) -> str:
    """What an evaluation at the start or end of training runs, for the phase line."""
    parts = [f"greedy pass@1 on {problems} problems"] if greedy else []
    if config.sample_k:
        parts.append(f"sampled pass@{config.sample_k}")
    if config.diagnostics_size:
        parts.append(f"teacher diagnostics on {min(config.diagnostics_size, problems)}")
    return ", ".join(parts)


def run_summary(evals: list[dict[str, Any]], step_seconds: list[float], wall_seconds: float) -> dict[str, Any]:
    """One method's summary: held-out pass@1 at the start, end and peak, final leakage (and, with a generated source,
    final citation of its contexts) and length, step time."""
    peak = max(evals, key=lambda row: row["pass_at_1"])
    cited = evals[-1].get("context_citation_rate")
    return {
        "initial_pass_at_1": evals[0]["pass_at_1"],
        "final_pass_at_1": evals[-1]["pass_at_1"],
        "peak_pass_at_1": peak["pass_at_1"],
        "peak_step": peak["step"],
        "final_leakage_rate": evals[-1]["leakage_rate"],
        **({} if cited is None else {"final_context_citation_rate": cited}),
        "final_mean_length": evals[-1]["mean_length"],
        "seconds_per_step": statistics.median(step_seconds),
        "wall_seconds": wall_seconds,
    }


class _Bar(TrainerCallback):
    """Advances a tqdm bar once per optimizer step and shows the last reward."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{logs['reward']:.2f}")


def trainer_args(config: DemoConfig, method: str, progress: bool = False) -> RLSDConfig:
    """The shared budget plus the method's own overrides (`lr_multiplier` scales the shared learning rate);
    `progress` shows the bar of the external teacher's warm start when it is trained here."""
    if method in CATALOGUE and CATALOGUE[method] is None and method not in config.method_overrides:
        raise ValueError(f"method {method!r} is not an RLSDTrainer run (its own trainer or several policies): "
                         "train it with `rlsd bench methods --methods NAME`")  # fmt: skip
    overrides = {**(CATALOGUE.get(method) or {}), **config.method_overrides.get(method, {})}
    if overrides.get("teacher") == "external" and "teacher_model" not in overrides:
        overrides["teacher_model"] = str(warm_start(config.external_teacher(), progress=progress))
    if overrides.get("credit") == "oracle":  # the benchmarks' positive control registers its rule on first use
        from rlsd.experiments.oracle import register

        register()
    budget = budget_kwargs(config, method)
    budget["learning_rate"] *= overrides.pop("lr_multiplier", 1.0)
    return RLSDConfig(
        **{
            **budget,
            "beta": 0.0,
            "loss_type": "dapo",
            "teacher_template": TEACHER_TEMPLATE,
            "rlsd_lambda_decay_steps": config.lambda_decay_steps,
            **overrides,
        }
    )


def budget_kwargs(config: DemoConfig, method: str) -> dict[str, Any]:
    """The training arguments every compared method shares: batch, length, steps, learning rate, clipping, seed."""
    return dict(
        output_dir=str(config.out / "trainer" / method),
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=config.warmup_steps,
        temperature=1.0,
        epsilon=0.2,
        epsilon_high=0.28,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=config.seed,
        disable_tqdm=True,
    )


def evaluate_heldout(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems, max_new_tokens: int, progress: bool = False,
    citations: HeldoutCitations | None = None,
) -> dict[str, float]:
    """Greedy pass@1 on the held-out problems, the share of completions that cite a hint, and the per-problem
    outcomes as a string of 0/1 in problem order (for problem-by-problem comparisons); with `citations` (a run with a
    generated source), the share that cite its recorded contexts (`HeldoutCitations.measure`)."""
    completions = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                           progress="greedy pass@1" if progress else None)  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    measured = citations.measure(completions) if citations is not None else {}
    return {**greedy_metrics(completions, rewards, tokenizer), **measured}


def _sampled_eval(model, tokenizer, problems, config: DemoConfig, step: int, progress: bool = False) -> dict[str, Any]:
    """Sampled pass@1 and pass@k at T = 1 (`k = sample_k` completions per problem) with the per-problem count of
    correct samples; the random state is forked and seeded so training is unaffected and runs are comparable."""
    k = config.sample_k
    prompts = [p.prompt for p in problems for _ in range(k)]
    with torch.random.fork_rng():
        torch.manual_seed(1_000 + config.seed)
        completions = generate(
            model, tokenizer, prompts, max_new_tokens=config.max_completion_length, do_sample=True, batch_size=512,
            progress=f"sampled pass@{k}" if progress else None,
        )  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems for _ in range(k)])
    counts = [int(sum(rewards[i * k : (i + 1) * k])) for i in range(len(problems))]
    return {
        "step": step,
        "k": k,
        "sampled_pass_at_1": sum(counts) / (k * len(counts)),
        "sampled_pass_at_k": sum(c > 0 for c in counts) / len(counts),
        "correct_counts": "".join(str(c) for c in counts) if k < 10 else counts,
    }


@torch.no_grad()
def teacher_diagnostics(
    model, tokenizer, problems, config: DemoConfig, step: int, progress: bool = False
) -> dict[str, Any]:
    """How well the privileged self-teacher (these weights, shown the answer) tells correct from wrong completions:
    one sampled completion per problem, per-token Delta = log p_T - log p_S, the AUC of the per-sequence mean Delta
    (correct above wrong), mean Delta by token position, and the share of clipped RLSD weights with sign(A) = +1 for
    correct and -1 for wrong completions (eps_w = 0.2)."""
    chosen = problems[: config.diagnostics_size]
    with torch.random.fork_rng():
        torch.manual_seed(2_000 + config.seed)
        completions = generate(
            model, tokenizer, [p.prompt for p in chosen], max_new_tokens=config.max_completion_length, do_sample=True,
            progress="diagnostics: sampling" if progress else None,
        )  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in chosen])
    was_training = model.training
    model.eval()
    means, by_position, clipped, tokens = [], [[] for _ in range(config.max_completion_length)], [0, 0], 0
    scored = tqdm(zip(chosen, completions, rewards, strict=True), total=len(chosen), desc="diagnostics: scoring",
                  unit="problem", leave=False, disable=not progress)  # fmt: skip
    for problem, completion, reward in scored:
        ids = tokenizer(completion)["input_ids"][: config.max_completion_length]
        if not ids:
            continue
        student = _sequence_logps(model, tokenizer(problem.prompt)["input_ids"], ids, 1.0)[0]
        tutor = _sequence_logps(model, tokenizer(teacher_prompt(problem))["input_ids"], ids, 1.0)[0]
        delta = (tutor - student).clamp(-20, 20)
        means.append((delta.mean().item(), reward))
        for position, value in enumerate(delta.tolist()):
            by_position[position].append(value)
        weight = torch.exp((1.0 if reward else -1.0) * delta)
        clipped[0] += int((weight < 0.8).sum())
        clipped[1] += int((weight > 1.2).sum())
        tokens += len(ids)
    model.train(was_training)
    return {
        "step": step,
        "auc": _auc([m for m, r in means if r], [m for m, r in means if not r]),
        "n_correct": sum(1 for _, r in means if r),
        "n_wrong": sum(1 for _, r in means if not r),
        "mean_delta_correct": _mean([m for m, r in means if r]),
        "mean_delta_wrong": _mean([m for m, r in means if not r]),
        "delta_by_position": [_mean(values) for values in by_position],
        "clip_low_frac": clipped[0] / max(tokens, 1),
        "clip_high_frac": clipped[1] / max(tokens, 1),
    }


def _auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney AUC); None without both."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


@torch.no_grad()
def credit_examples(
    trainer: RLSDTrainer, tokenizer, problems, config: DemoConfig, progress: bool = False
) -> dict[str, Any]:
    """A correct and a wrong sampled completion with each token's Delta and RLSD weight, for the viewer, scored by
    the trainer's own teacher and student passes (`teacher_scores`, `score_rollout`)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    completions = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens=config.max_completion_length,
                           do_sample=True, progress="credit viewer" if progress else None)  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    picked = {label: next((i for i, r in enumerate(rewards) if r == wanted), None)
              for label, wanted in (("correct", 1.0), ("wrong", 0.0))}  # fmt: skip
    picked = {label: index for label, index in picked.items() if index is not None}
    if not picked:
        return {}
    chosen = [problems[i] for i in picked.values()]
    rows = [{"prompt": p.prompt, trainer.args.privileged_column: str(p.answer)} for p in chosen]
    output = _rollout_of(tokenizer, rows, [completions[i] for i in picked.values()], config.max_completion_length)
    tutor = trainer.teacher_scores(rows, output).logps.double()
    student = trainer.score_rollout("student", output).logps.double()
    examples = {}
    for row, (label, problem) in enumerate(zip(picked, chosen, strict=True)):
        sign = 1.0 if label == "correct" else -1.0
        keep = output["completion_mask"][row].bool()
        ids, delta = output["completion_ids"][row][keep], (tutor[row] - student[row])[keep]
        multiplier, _ = rlsd_advantages(torch.tensor([sign], dtype=torch.float64), tutor[row : row + 1, : len(ids)],
                                        student[row : row + 1, : len(ids)], torch.ones(1, len(ids)), lam=1.0,
                                        clip=trainer.args.rlsd_clip)  # fmt: skip
        examples[label] = {
            "prompt": problem.prompt,
            "answer": problem.answer,
            "advantage_sign": sign,
            "tokens": [tokenizer.decode([t]) for t in ids.tolist()],
            "delta": delta.tolist(),
            "weight": torch.exp(sign * delta).tolist(),
            "clipped_weight": (multiplier[0] / sign).tolist(),
        }
    return examples


def _rollout_of(tokenizer, rows: list[dict[str, Any]], completions: list[str], max_length: int) -> dict[str, Any]:
    """A rollout dict (left-padded prompt ids, right-padded completion ids, masks) as TRL's rollout builds it."""
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    answers = [tokenizer(text)["input_ids"][:max_length] or [tokenizer.eos_token_id] for text in completions]
    return {
        "prompt_ids": pad(
            [torch.tensor(p) for p in prompts], padding_value=tokenizer.pad_token_id, padding_side="left"
        ),
        "prompt_mask": pad(
            [torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left"
        ),
        "completion_ids": pad([torch.tensor(a) for a in answers], padding_value=tokenizer.pad_token_id),
        "completion_mask": pad([torch.ones(len(a), dtype=torch.long) for a in answers], padding_value=0),
    }


def _sequence_logps(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> torch.Tensor:
    """(1, T) log-probs of the completion tokens after the prompt, temperature-scaled as in sampling, by the
    library's scorer (`rlsd.step.scoring.score_tokens`)."""
    scores = score_tokens(model, torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long),
                          torch.tensor([completion_ids]), torch.ones(1, len(completion_ids), dtype=torch.long),
                          temperature=temperature, batch_size=1)  # fmt: skip
    return scores.logps.double()


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def jsonable(value: Any) -> Any:
    """Paths to strings, recursively, for summary.json."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


Config = TypeVar("Config")


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy of a demo's config dataclass (text, vision or agent) with fields replaced (None values ignored)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
