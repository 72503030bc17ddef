"""`rlsd demo --task agent`: a hidden-value lookup that the tiny model must query with a tool before answering.

Each row asks for the value stored under a key (`key c?`); the value, a digit drawn per row, is known only to the
row's environment (`LookupEnv`, TRL's `environment_factory`), whose `lookup` tool returns it. A correct completion
calls the tool (`[lookup key=c]`), reads the result TRL appends (`T: 5`) and answers (`5`); answering at once is
a guess (one in ten). The warm start calls the tool in about half of its completions and guesses otherwise, so RL has
room to teach the call. The self-teacher sees the same conversation with the answer in the user turn (`[ref 5] key
c?`). GRPO, RLSD and SOD are compared from the same warm start; nothing is downloaded.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from rlsd.experiments.demo import DemoConfig, _sequence_logps
from rlsd.experiments.task import TEACHER_TEMPLATE, leakage_rate
from rlsd.experiments.task_demo import TaskDemo, run_task_demo, task_budget
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2
from rlsd.experiments.warmstart import cached_warm_start, config_key, labelled_batch, supervised_warm_start

AGENT_WARMSTART_FORMAT_VERSION = 1
"""Bump when the agent warm-start recipe changes in a way its configuration does not capture."""
KEYS = "abcdefgh"
"""The keys a row may ask for."""
AGENT_CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}A: {{ m.get('content') or '' }}"
    "{% for c in m.get('tool_calls') or [] %}[{{ c['function']['name'] }}"
    "{% for k, v in c['function']['arguments'].items() %} {{ k }}={{ v }}{% endfor %}]{% endfor %}<eos>\n"
    "{% elif m['role'] == 'tool' %}T: {{ m['content'] }}\n"
    "{% else %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
"""A chat template with tools for the character tokenizer, short in tokens: roles `U:`, `A:` (assistant), `T:` (tool
result), a tool call `[name key=value]`."""
AGENT_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "A: ",
    "fields": {
        "tool_calls": {
            "open_pattern": r"\[(?P<name>[a-z_]+)",
            "close_pattern": r"\]\s*",
            "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern": r"(?P<key>[a-z_]+)=(?P<value>[^ \]]*)", "value_parser": {"name": "text"}},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"<eos>\s*", "content": "text"},
    },
}
"""How TRL's `parse_response` reads the model's turns into tool calls and answers."""
CALL_RE = re.compile(r"^\[lookup key=([a-z]*)\]")


class LookupEnv:
    """One row's hidden value: `reset` receives the row (its `key` and `solution`) and shows nothing."""

    def reset(self, **row: Any) -> None:
        self.key, self.value = row["key"], str(row["solution"])

    def lookup(self, key: str) -> str:
        """Read the hidden value stored under a key.

        Args:
            key: the key to read.
        """
        return self.value if key == self.key else "none"


def agent_reward(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1 when the last assistant turn is exactly the hidden value."""
    last = [(turns[-1].get("content") or "") if turns else "" for turns in completions]
    return [float(text.strip() == str(answer)) for text, answer in zip(last, solution, strict=True)]


def build_agent_tokenizer() -> PreTrainedTokenizerBase:
    """The character tokenizer with the tool chat template and its response parser."""
    tokenizer = build_char_tokenizer()
    return with_agent_templates(tokenizer)


def with_agent_templates(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set the tool chat template and the response parser (a loaded tokenizer may not keep the parser)."""
    tokenizer.chat_template = AGENT_CHAT_TEMPLATE
    tokenizer.response_template = AGENT_RESPONSE_TEMPLATE
    return tokenizer


def question(key: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"key {key}?"}]


def make_agent_dataset(count: int, seed: int) -> Dataset:
    """Rows for `RLSDTrainer` with `environment_factory=LookupEnv`: the question, its key and hidden value."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        key, value = rng.choice(KEYS), str(rng.randrange(10))
        rows.append({"prompt": question(key), "key": key, "solution": value})
    return Dataset.from_list(rows)


def evaluation_rows(count: int) -> list[dict[str, Any]]:
    """The fixed held-out rows (a seed no training set uses)."""
    return list(make_agent_dataset(count, seed=10_007))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt ids as TRL renders them for the environment (its `lookup` tool schema included)."""
    return tokenizer.apply_chat_template(
        messages, tools=[LookupEnv().lookup], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def tool_suffix(tokenizer: PreTrainedTokenizerBase, value: str) -> list[int]:
    """The tokens the environment writes after a tool call: the result and the next assistant header."""
    return tokenizer(f"\nT: {value}\nA: ", add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------- the warm start
@dataclass(frozen=True)
class AgentWarmStartConfig:
    """Everything that determines the warm-started tiny Qwen2; its hash names the cache entry."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    tool_share: float = 0.5  # share of transcripts that call the tool (the others guess a digit)
    teacher_share: float = 0.3  # share of transcripts in the teacher format (`[ref v]` in the user turn)
    seed: int = 0

    def key(self) -> str:
        return config_key(AGENT_WARMSTART_FORMAT_VERSION, asdict(self))


def transcript(tokenizer, rng: random.Random, config: AgentWarmStartConfig) -> tuple[list[int], list[int]]:
    """One supervised example (ids, labels): the prompt and the environment's tokens unscored, the model's turns
    scored. A `tool_share` of them call the tool; the others answer at once: a guess in the student format, the
    shown value in the teacher format (so that the self-teacher's Delta marks wrong guesses)."""
    key, value = rng.choice(KEYS), str(rng.randrange(10))
    messages = question(key)
    shown = rng.random() < config.teacher_share
    if shown:
        messages = [{"role": "user", "content": TEACHER_TEMPLATE.format(answer=value, prompt=messages[0]["content"])}]
    prompt = render_prompt(tokenizer, messages)
    if rng.random() < config.tool_share:
        call, env = encode(tokenizer, f"[lookup key={key}]<eos>"), tool_suffix(tokenizer, value)
        answer = encode(tokenizer, f"{value}<eos>")
        return prompt + call + env + answer, [-100] * len(prompt) + call + [-100] * len(env) + answer
    # the student guesses; the teacher, shown the value, answers it at once
    guess = encode(tokenizer, f"{value if shown else rng.randrange(10)}<eos>")
    return prompt + guess, [-100] * len(prompt) + guess


def train_agent_warm_start(config: AgentWarmStartConfig, progress: bool = True):
    """Next-token cross-entropy on the model's turns of tool-calling and guessing transcripts; returns the model,
    the tokenizer and the seconds it took."""
    start = time.perf_counter()
    tokenizer = build_agent_tokenizer()
    model = build_tiny_qwen2(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, intermediate_size=config.intermediate_size,
                             seed=config.seed)  # fmt: skip
    supervised_warm_start(
        model, config, lambda rng: transcript(tokenizer, rng, config),
        lambda rows: labelled_batch(rows, tokenizer.pad_token_id), "agent warm start", progress, scheduled=False,
    )  # fmt: skip
    return model, tokenizer, time.perf_counter() - start


def agent_warm_start(config: AgentWarmStartConfig, progress: bool = True) -> Path:
    """Path of the warm-started model for `config`, training and caching it on first use."""
    return cached_warm_start("agent-warmstart", config, lambda: train_agent_warm_start(config, progress))


def load_agent_warm_start(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), with_agent_templates(AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------------------ the evaluation
@torch.no_grad()
def generate_turn(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, sample: bool) -> list[list[int]]:
    """One turn per prompt (left-padded), cut after its end-of-sequence token (kept)."""
    ids = pad([torch.tensor(p) for p in prompts], padding_value=tokenizer.pad_token_id, padding_side="left")
    mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left")
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         **sampling)  # fmt: skip
    turns = []
    for row in out[:, ids.size(1) :].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        turns.append(row[:end])
    return turns


def run_episodes(model, tokenizer, rows, max_new_tokens: int = 16, sample: bool = False) -> list[dict[str, Any]]:
    """The tool loop of the task for each row, at most one call: a first turn, the tool's result when the turn
    calls it, a second turn. Each episode: its completion ids, env mask, final answer and whether it called."""
    was_training = model.training
    model.eval()
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    first = generate_turn(model, tokenizer, prompts, max_new_tokens, sample)
    episodes = []
    for row, turn in zip(rows, first, strict=True):
        text = tokenizer.decode(turn, skip_special_tokens=True)
        call = CALL_RE.match(text)
        episode = {"ids": turn, "mask": [1] * len(turn), "answer": text.strip(), "called": call is not None}
        if call is not None:
            env = LookupEnv()
            env.reset(**row)
            suffix = tool_suffix(tokenizer, env.lookup(call.group(1)))
            episode.update(ids=turn + suffix, mask=episode["mask"] + [0] * len(suffix))
        episodes.append(episode)
    called = [i for i, e in enumerate(episodes) if e["called"]]
    if called:
        second = generate_turn(model, tokenizer, [prompts[i] + episodes[i]["ids"] for i in called], 4, sample)
        for i, turn in zip(called, second, strict=True):
            e = episodes[i]
            e.update(ids=e["ids"] + turn, mask=e["mask"] + [1] * len(turn))
            e["answer"] = tokenizer.decode(turn, skip_special_tokens=True).strip()
    model.train(was_training)
    return episodes


def evaluate_agent(model, tokenizer, rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Sampled pass@1 (T = 1, one episode per row, seeded) through the tool loop, the share of episodes that called
    the tool, leakage and mean length. Sampled, not greedy: the warm start's most likely first token is already the
    call (about half of the samples call, against 1 in 20 for any one digit), so greedy pass@1 starts saturated."""
    with torch.random.fork_rng():
        torch.manual_seed(1_000 + seed)
        episodes = run_episodes(model, tokenizer, rows, sample=True)
    correct = [float(e["answer"] == str(row["solution"])) for e, row in zip(episodes, rows, strict=True)]
    texts = [tokenizer.decode(e["ids"], skip_special_tokens=True) for e in episodes]
    return {
        "pass_at_1": sum(correct) / len(correct),
        "tool_call_rate": sum(e["called"] for e in episodes) / len(episodes),
        "leakage_rate": leakage_rate(texts),
        "mean_length": statistics.mean(sum(e["mask"]) for e in episodes),
        "correct": "".join(str(int(c)) for c in correct),
    }


# ------------------------------------------------------------------------------------------------------- the demo
@dataclass
class AgentDemoConfig:
    """One agent comparison: the same warm start, budget and seed for every method (sized for 2 CPU cores)."""

    methods: tuple[str, ...] = ("grpo", "rlsd", "sod")
    steps: int = 40
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 200
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 1e-3
    lambda_decay_steps: int = 50
    max_completion_length: int = 40  # the whole multi-turn completion: call, tool result and answer
    train_size: int = 1000
    out: Path = Path("runs/agent-demo")
    warm: AgentWarmStartConfig = field(default_factory=AgentWarmStartConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.eval_size < 1:
            raise ValueError("steps, eval_every and eval_size must be >= 1")

    def budget(self) -> DemoConfig:
        """The text demo's config carrying this budget, for the shared `trainer_args`."""
        return task_budget(self)


def agent_quick_config(out: Path, seed: int = 0) -> AgentDemoConfig:
    """A smoke run for tests: a very small warm start and two steps per method, every file still written."""
    warm = AgentWarmStartConfig(hidden_size=32, num_heads=2, intermediate_size=64, steps=10, batch_size=8)
    return AgentDemoConfig(steps=2, eval_every=1, eval_size=8, prompts_per_step=2, num_generations=4,
                           lambda_decay_steps=2, train_size=16, out=out, warm=warm, seed=seed)  # fmt: skip


def agent_demo(config: AgentDemoConfig) -> TaskDemo:
    """The agent task as the shared runner takes it: sampled pass@1 through the tool loop (and the tool-call rate) on
    held-out episodes, TRL's environment tool loop in training, the credit viewer of RLSD's policy (else of the first
    method with a teacher) over a sampled episode's turns and tool result."""
    rows = evaluation_rows(config.eval_size)
    return TaskDemo(
        task="agent", warm_namespace="agent-warmstart", warm_config=config.warm, warm_steps=config.warm.steps,
        warm_start=lambda progress: agent_warm_start(config.warm, progress=progress), load=load_agent_warm_start,
        dataset=lambda: make_agent_dataset(config.train_size, seed=config.seed),
        evaluate=lambda policy, tokenizer: evaluate_agent(policy, tokenizer, rows, config.seed),
        evaluation=f"sampled pass@1 on {len(rows)} episodes", reward=agent_reward,
        viewer=lambda trainer: agent_credit_examples(trainer, rows, config),
        viewer_from=lambda method, trainer, viewer: trainer.teacher is not None and (method == "rlsd" or not viewer),
        trainer_kwargs={"environment_factory": LookupEnv},
        method_summary=lambda evals: {"final_tool_call_rate": evals[-1]["tool_call_rate"]},
    )  # fmt: skip


def run_agent_demo(config: AgentDemoConfig, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method from the same agent warm start with TRL's environment tool loop; write metrics.jsonl,
    summary.json, curves.png and report.html (curves, table, and the credit viewer over a sampled episode's turns
    and tool result): `run_task_demo`."""
    return run_task_demo(config, agent_demo(config), progress, threads)


@torch.no_grad()
def agent_credit_examples(trainer, rows: list[dict[str, Any]], config: AgentDemoConfig) -> dict[str, Any]:
    """A correct and a wrong sampled episode of the trained policy, each token with its Delta (the teacher sees the
    conversation with the answer) and RLSD weight; the environment's tokens show Delta 0 and weight 1 (no credit)."""
    from rlsd.core.credit import rlsd_advantages

    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer.teacher, "model", None) or model
    tokenizer = trainer.processing_class
    with torch.random.fork_rng():
        torch.manual_seed(3_000 + config.seed)
        episodes = run_episodes(model, tokenizer, rows, sample=True)
    examples: dict[str, Any] = {}
    for label, wanted in (("correct", True), ("wrong", False)):
        index = next((i for i, (e, r) in enumerate(zip(episodes, rows, strict=True))
                      if (e["answer"] == str(r["solution"])) == wanted and e["ids"]), None)  # fmt: skip
        if index is None:
            continue
        episode, row, sign = episodes[index], rows[index], 1.0 if wanted else -1.0
        shown = [
            {"role": "user", "content": TEACHER_TEMPLATE.format(answer=row["solution"], prompt=f"key {row['key']}?")}
        ]
        temperature = trainer.args.temperature
        student = _sequence_logps(model, render_prompt(tokenizer, row["prompt"]), episode["ids"], temperature)
        tutor = _sequence_logps(teacher, render_prompt(tokenizer, shown), episode["ids"], temperature)
        mask = torch.tensor([episode["mask"]], dtype=torch.float64)
        advantages, _ = rlsd_advantages(torch.tensor([sign], dtype=torch.float64), tutor, student, mask, lam=1.0,
                                        clip=trainer.args.rlsd_clip)  # fmt: skip
        delta = ((tutor - student) * mask)[0]
        examples[label] = {
            "prompt": f"key {row['key']}? (hidden value {row['solution']})",
            "answer": row["solution"],
            "advantage_sign": sign,
            "tokens": [tokenizer.decode([t]) for t in episode["ids"]],
            "delta": delta.tolist(),
            "weight": torch.where(mask[0] > 0, torch.exp(sign * delta), torch.ones_like(delta)).tolist(),
            "clipped_weight": torch.where(mask[0] > 0, advantages[0] / sign, torch.ones_like(delta)).tolist(),
            "env_mask": list(episode["mask"]),  # the viewer greys the tool result and marks the turns
        }
    return examples
