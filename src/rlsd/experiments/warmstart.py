"""Supervised warm start of the tiny model on the embedded task, run once and cached by its configuration.

The mix holds student-format examples (`Q: ...=` -> solution) and teacher-format examples (`[ref 65] Q: ...=` ->
solution), a share of which cite the hint (`<think>ref=65;...`). The model therefore learns both to solve and to
use a reference when it is shown one, which is what makes it a useful privileged self-teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlsd.experiments.task import (
    Problem,
    TaskConfig,
    accuracy_reward,
    sample_problems,
    steps_teacher_prompt,
    teacher_prompt,
)
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2
from rlsd.infra.progress import ticking

WARMSTART_FORMAT_VERSION = 3
"""Bump when the warm-start recipe changes in a way its configuration does not capture."""


def config_key(version: int, fields: dict[str, Any]) -> str:
    """A warm start's cache key: the first 16 hex digits of the sha256 of its format version and fields (sorted
    JSON), so that any change to either names a new cache entry."""
    payload = json.dumps({"version": version, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that determines the warm-started model; its hash names the cache entry."""

    task: TaskConfig = field(default_factory=TaskConfig)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    steps: int = 450
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # after `warmup_steps` linear warm-up: "constant", or "cosine" (decay to 10%)
    warmup_steps: int = 20
    teacher_share: float = 0.3  # share of examples in the teacher format
    hint_share: float = 0.2  # share of teacher-format solutions that cite the hint (6% of all targets)
    steps_share: float = 0.0  # share of teacher-format prompts shown the worked steps instead of the answer
    train_pool: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0.0 <= self.steps_share <= 1.0:
            raise ValueError(f"steps_share must lie in [0, 1], got {self.steps_share}")

    def key(self) -> str:
        """The cache key: a hash of the configuration, the fields added since (`steps_share`, the task's
        `max_operands`) left out at their defaults so that the caches made before them keep their keys."""
        fields = {**asdict(self), "task": self.task.key_dict()}
        if self.steps_share == 0.0:
            del fields["steps_share"]
        return config_key(WARMSTART_FORMAT_VERSION, fields)


def external_teacher_config(student: WarmStartConfig) -> WarmStartConfig:
    """The embedded task's external teacher (OPD and the teacher-rollout methods): the student's recipe and data on a
    model about 3x larger (hidden 192, 6 layers; 3.6M parameters against 1.1M), trained 2.2x longer."""
    return replace(student, hidden_size=192, num_layers=6, num_heads=6, intermediate_size=768, steps=1000)


def default_cache_dir() -> Path:
    """`$RLSD_CACHE`, else `~/.cache/rlsd`."""
    return Path(os.environ.get("RLSD_CACHE", Path.home() / ".cache" / "rlsd"))


def warm_start(config: WarmStartConfig, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the warm-started model for `config`, training and caching it on first use."""
    return cached_warm_start("warmstart", config, lambda: train_warm_start(config, progress=progress), cache_dir)


def cached_warm_start(
    kind: str, config: Any, train: Callable[[], tuple[Any, Any, float]], cache_dir: Path | None = None
) -> Path:
    """`<cache>/<kind>/<config.key()>`: trained with `train()` (model, tokenizer or processor, seconds) and saved
    on first use, under a temporary name renamed into place, so that a killed run leaves no half-written cache."""
    target = (cache_dir or default_cache_dir()) / kind / config.key()
    if is_cached(kind, config, cache_dir):
        return target
    model, processing, seconds = train()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processing.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps({"config": asdict(config), "seconds": seconds}, indent=2))
    tmp.rename(target) if not target.exists() else None
    return target


def is_cached(kind: str, config: Any, cache_dir: Path | None = None) -> bool:
    """Whether `cached_warm_start(kind, config)` would load from the cache rather than train."""
    return ((cache_dir or default_cache_dir()) / kind / config.key() / "warmstart.json").exists()


def load_warm_start(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The cached model and tokenizer, through the ordinary `from_pretrained` entry points."""
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def train_warm_start(
    config: WarmStartConfig, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, float]:
    """Next-token cross-entropy on completion tokens of the mixed-format examples; returns the seconds it took."""
    start = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    pool = sample_problems(config.task, config.train_pool, config.seed, "train")
    supervised_warm_start(
        model, config, lambda rng: _example(rng.choice(pool), rng, config),
        lambda examples: _collate(examples, tokenizer), "warm start", progress,
    )  # fmt: skip
    return model, tokenizer, time.perf_counter() - start


def supervised_warm_start(
    model: PreTrainedModel,
    config: Any,
    draw: Callable[[random.Random], Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    desc: str,
    progress: bool = True,
    scheduled: bool = True,
) -> None:
    """Every embedded task's warm-start loop: `config.steps` AdamW updates (warm-up, then `config.lr_schedule`;
    a constant `config.learning_rate` unless `scheduled`) on batches of `config.batch_size` examples drawn in order
    by `draw(rng)` from one `random.Random(config.seed)`, scored by the model's loss on `collate(examples)`; leaves
    the model in eval mode."""
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for step in bar:
        for group in optimizer.param_groups if scheduled else ():
            group["lr"] = config.learning_rate * _lr_factor(step, config)
        examples = [draw(rng) for _ in range(config.batch_size)]
        bar.set_postfix(loss=supervised_step(model, optimizer, model(**collate(examples)).loss))
    model.eval()


def supervised_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> str:
    """One supervised update of a warm start (gradients clipped at norm 1.0); the loss formatted for the progress
    bar. Every embedded task's warm start trains through it."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return f"{loss.item():.3f}"


def _lr_factor(step: int, config: WarmStartConfig) -> float:
    """Linear warm-up, then constant, or cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _example(problem: Problem, rng: random.Random, config: WarmStartConfig) -> tuple[str, str]:
    """(prompt, completion) in the student format, or in the teacher format with an optional hint citation."""
    if rng.random() < config.teacher_share:
        shown = teacher_prompt(problem)
        if config.steps_share and rng.random() < config.steps_share:  # no draw at 0: the default mix is unchanged
            shown = steps_teacher_prompt(problem)
        return shown, problem.solution(cite_hint=rng.random() < config.hint_share)
    return problem.prompt, problem.solution()


def _collate(examples: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels that score only the completion and its end-of-sequence token."""
    return pad_completion_rows([tokenizer(p)["input_ids"] for p, _ in examples], [c for _, c in examples], tokenizer)


def pad_completion_rows(
    prompts: list[list[int]], completions: list[str], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels of prompt-id + completion rows, the labels scoring only each
    completion and its end-of-sequence token (the text, image and video warm starts' supervised batch)."""
    rows = []
    for prompt_ids, completion in zip(prompts, completions, strict=True):
        completion_ids = [*tokenizer(completion)["input_ids"], tokenizer.eos_token_id]
        rows.append((prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids))
    return labelled_batch(rows, tokenizer.pad_token_id)


def labelled_batch(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` of (ids, labels) rows, right-padded (ids with `pad_token_id`,
    labels with -100): every embedded warm start's supervised batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 128,
    progress: str | None = None,
) -> list[str]:
    """Completions of plain-text prompts, left-padded in batches (greedy unless `do_sample`); `progress` names a
    transient progress bar over the prompts (None: no bar)."""
    was_training = model.training
    model.eval()
    completions: list[str] = []
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", leave=False, disable=progress is None)
    with ticking(bar):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            completions += generate_batch(model, tokenizer, batch, max_new_tokens, do_sample, temperature)
            bar.update(len(batch["input_ids"]))
    bar.close()
    model.train(was_training)
    return [c.replace(tokenizer.pad_token, "").replace(tokenizer.eos_token, "") for c in completions]


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
) -> list[str]:
    """The decoded new tokens of one tokenized (or processed) batch: greedy, or sampled from the full distribution
    at `temperature` (no top-k / top-p truncation), special tokens kept for the caller to strip."""
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=False)


def pass_at_1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
) -> tuple[float, list[str]]:
    """Share of prompts whose single completion the verifier accepts, and the completions."""
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample)
    rewards = accuracy_reward(completions, answers)
    return sum(rewards) / len(rewards), completions
