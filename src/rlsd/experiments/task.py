"""The embedded verifiable task: multi-step integer arithmetic with a short chain of thought.

A problem is `Q: 3+4*5-2=`. Under the default `products-first` semantics the products are worked out first
(never two `*` in a row, multiplier 2-9), then the rest left to right, one step per operator:
`<think>4*5=20;3+20=23;23-2=21</think><answer>21</answer>`. Under `left-to-right` (version 0.1's task) every
operator is applied in order, so products chain and may multiply a multi-digit intermediate. The teacher's prompt
also shows the reference answer, and a share of the teacher-format warm-start solutions cite it (`ref=21;` before
the steps), so that a student which writes `ref=` without ever having seen a reference shows the paper's leakage.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from datasets import Dataset

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SEMANTICS = ("products-first", "left-to-right")
"""How a problem is evaluated: products first (the default), or strictly left to right (version 0.1's task)."""
TEACHER_TEMPLATE = "[ref {answer}] {prompt}"
"""Plain-text teacher template of the embedded task: the reference answer in front of the student's prompt."""
SIBLING_TEMPLATE = "[ref {sibling}] {prompt}"
"""The same slot showing a successful sibling completion instead of the answer (`privileged_source="sibling"`)."""
HINT_PREFIX = "ref="
"""What a solution that cites the hint writes first inside `<think>`."""

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER_RE = re.compile(r"-?\d{1,40}")
_LEAK_RE = re.compile(r"ref\s*=|\[ref\b|\breference\b", re.IGNORECASE)


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the arithmetic task. The chain has `num_operands - 1` steps."""

    num_operands: int = 4
    operand_digits: int = 1
    operators: str = "+-*"
    heldout_percent: int = 10  # share of all problems that belong to the held-out split, by hash
    semantics: str = "products-first"  # or "left-to-right": every operator in order, products may chain
    max_operands: int = 0  # > 0: each problem draws its operand count uniformly from num_operands..max_operands

    def __post_init__(self) -> None:
        if self.num_operands < 2:
            raise ValueError(f"num_operands must be >= 2, got {self.num_operands}")
        if self.max_operands and self.max_operands < self.num_operands:
            raise ValueError(f"max_operands must be 0 or >= num_operands {self.num_operands}, got {self.max_operands}")
        if self.operand_digits < 1:
            raise ValueError(f"operand_digits must be >= 1, got {self.operand_digits}")
        unknown = sorted(set(self.operators) - set(OPERATORS))
        if not self.operators or unknown:
            raise ValueError(f"operators must be drawn from '+-*', got {self.operators!r}")
        if not 0 < self.heldout_percent < 100:
            raise ValueError(f"heldout_percent must lie in (0, 100), got {self.heldout_percent}")
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields added after caches were keyed on it, when at their defaults (a warm start's
        cache key stays that of the task before those fields existed)."""
        return {k: v for k, v in asdict(self).items() if not (k in _KEYLESS_DEFAULTS and v == _KEYLESS_DEFAULTS[k])}

    def operand_counts(self) -> range:
        """The operand counts a problem may have."""
        return range(self.num_operands, max(self.num_operands, self.max_operands) + 1)


_KEYLESS_DEFAULTS = {"max_operands": 0}
"""Task fields added after warm-start caches were keyed on the task, with the default that leaves them out of a key."""

TASKS = {
    "default": TaskConfig(),
    "long": TaskConfig(num_operands=8, max_operands=12),
}
"""The embedded task's named regimes (`rlsd bench ... --task NAME`). `long` (issue 26): chains of 8-12 one-digit
operands (7-11 computed steps, completions of about 50-120 tokens), where a wrong completion holds many correct steps
that uniform credit blames with its error."""


def task_by_name(name: str) -> TaskConfig:
    """The named regime `name`; an unknown name is refused with the known ones listed."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class Problem:
    """One problem: its operands and operators, and the derived prompt, steps and answer."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]
    semantics: str = "products-first"

    @property
    def prompt(self) -> str:
        expression = str(self.operands[0])
        for op, value in zip(self.operators, self.operands[1:], strict=True):
            expression += f"{op}{value}"
        return f"Q: {expression}="

    @property
    def steps(self) -> list[str]:
        """`a op b = c` for each operator: with `products-first`, every product, then the rest left to right."""
        operands, operators, steps = list(self.operands), list(self.operators), []
        if self.semantics == "products-first":
            while "*" in operators:
                i = operators.index("*")
                product = operands[i] * operands[i + 1]
                steps.append(f"{operands[i]}*{operands[i + 1]}={product}")
                operands[i : i + 2], operators[i : i + 1] = [product], []
        value = operands[0]
        for op, operand in zip(operators, operands[1:], strict=True):
            result = OPERATORS[op](value, operand)
            steps.append(f"{value}{op}{operand}={result}")
            value = result
        return steps

    @property
    def answer(self) -> int:
        return int(self.steps[-1].rsplit("=", 1)[1])

    def solution(self, cite_hint: bool = False) -> str:
        """The target completion; with `cite_hint` it first writes the reference it was shown."""
        hint = f"{HINT_PREFIX}{self.answer};" if cite_hint else ""
        return f"<think>{hint}{';'.join(self.steps)}</think><answer>{self.answer}</answer>"


def is_heldout(problem: Problem, config: TaskConfig) -> bool:
    """Split membership by a hash of the prompt: the same problem is always on the same side."""
    digest = hashlib.sha256(problem.prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < config.heldout_percent


def sample_problems(config: TaskConfig, count: int, seed: int, split: str) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "test"), deterministic in `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    low = 0 if config.operand_digits == 1 else 10 ** (config.operand_digits - 1)
    high = 10**config.operand_digits - 1
    share = config.heldout_percent / 100 if split == "test" else 1 - config.heldout_percent / 100
    values, ops = high - low + 1, len(config.operators)
    available = sum(values**n * ops ** (n - 1) for n in config.operand_counts()) * share
    if count > 0.8 * available:
        raise ValueError(f"{count} distinct {split} problems requested, but {config} has only about {available:.0f}")
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 10_000:
            raise ValueError(f"could not draw {count} distinct {split} problems from {config}")
        problem = _draw_problem(rng, config, low, high)
        if is_heldout(problem, config) == (split == "test"):
            problems.setdefault(problem.prompt, problem)
    return list(problems.values())


def _draw_problem(rng: random.Random, config: TaskConfig, low: int, high: int) -> Problem:
    """Uniform operands and operators; under `products-first`, no two `*` in a row and every multiplier in 2-9."""
    operators: list[str] = []
    count = rng.randint(config.num_operands, config.max_operands) if config.max_operands else config.num_operands
    for _ in range(count - 1):
        allowed = config.operators
        if config.semantics == "products-first" and operators[-1:] == ["*"] and set(allowed) - {"*"}:
            allowed = allowed.replace("*", "")
        operators.append(rng.choice(allowed))
    operands = [rng.randint(low, high) for _ in range(count)]
    if config.semantics == "products-first":
        operands = [rng.randint(2, 9) if i > 0 and operators[i - 1] == "*" else v for i, v in enumerate(operands)]
    return Problem(operands=tuple(operands), operators=tuple(operators), semantics=config.semantics)


HELDOUT_SIZE = 500
"""Size of the fixed held-out evaluation set every reported number is measured on."""
PILOT_SIZE = 200
"""Size of the pilot evaluation set used to choose a regime; disjoint from the held-out set."""


def evaluation_problems(config: TaskConfig, count: int, purpose: str = "heldout") -> list[Problem]:
    """The first `count` problems of the fixed held-out set, or of the pilot set (test split, never in the held-out
    set), so that choosing a regime on the pilot set leaves the held-out numbers untouched."""
    heldout = sample_problems(config, HELDOUT_SIZE, seed=10_000, split="test")
    if purpose == "heldout":
        if count > HELDOUT_SIZE:
            raise ValueError(f"the held-out set has {HELDOUT_SIZE} problems, {count} requested")
        return heldout[:count]
    if purpose != "pilot":
        raise ValueError(f"purpose must be 'heldout' or 'pilot', got {purpose!r}")
    taken = {p.prompt for p in heldout}
    pool = sample_problems(config, count + HELDOUT_SIZE, seed=20_000, split="test")
    return [p for p in pool if p.prompt not in taken][:count]


def make_rl_dataset(config: TaskConfig, count: int, seed: int, split: str = "train") -> Dataset:
    """Rows for `RLSDTrainer`: `prompt` (plain text), `solution` (the reference final answer) and `worked_steps` (the
    task's steps with their results, `4*5=20;3+20=23;23-2=21`: the privileged context with intermediate values,
    `privileged_column="worked_steps"`)."""
    problems = sample_problems(config, count, seed, split)
    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "solution": [str(p.answer) for p in problems],
            "worked_steps": [worked_steps(p) for p in problems],
        }
    )


def worked_steps(problem: Problem) -> str:
    """The task's steps with their results, `;`-joined: the privileged context with intermediate values."""
    return ";".join(problem.steps)


def steps_teacher_prompt(problem: Problem) -> str:
    """The teacher's prompt with intermediate values: the teacher template's slot holds the worked steps."""
    return TEACHER_TEMPLATE.format(prompt=problem.prompt, answer=worked_steps(problem))


def teacher_prompt(problem: Problem) -> str:
    """The prompt the privileged teacher sees: the student's prompt with the reference answer."""
    return TEACHER_TEMPLATE.format(prompt=problem.prompt, answer=problem.answer)


def parse_answer(completion: str) -> int | None:
    """The integer inside the single `<answer>...</answer>`; None if absent, repeated or not an integer."""
    matches = _ANSWER_RE.findall(completion)
    if len(matches) != 1:
        return None
    text = matches[0].strip()
    return int(text) if _INTEGER_RE.fullmatch(text) else None


def accuracy_reward(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """Verifier with TRL's reward signature: 1.0 when the parsed answer equals the reference, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, solution, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        rewards.append(1.0 if parse_answer(text) == int(reference) else 0.0)
    return rewards


def refers_to_hint(completion: str) -> bool:
    """Leakage detector: the completion cites a reference it was never shown (`ref=`, `[ref`, `reference`)."""
    return _LEAK_RE.search(completion) is not None


def leakage_rate(completions: list[str]) -> float:
    """Share of completions that refer to the hint."""
    if not completions:
        raise ValueError("leakage_rate needs at least one completion")
    return sum(refers_to_hint(c) for c in completions) / len(completions)


def greedy_metrics(completions: list[str], rewards: list[float], tokenizer: Any) -> dict[str, Any]:
    """The metrics of every greedy held-out evaluation: pass@1 (the mean 0/1 reward), the leakage rate, the mean
    length in tokens and the per-item outcomes as a 0/1 string (for item-by-item comparisons)."""
    return {
        "pass_at_1": sum(rewards) / len(rewards),
        "leakage_rate": leakage_rate(completions),
        "mean_length": statistics.mean(len(tokenizer(c)["input_ids"]) for c in completions),
        "correct": "".join(str(int(r)) for r in rewards),
    }
