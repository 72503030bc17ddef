"""CoARS's embedded task (arXiv 2604.10029, reconstructed): a recommender and a user simulator in a toy dialogue.

The paper's agents talk about real catalogues (LastFM, MovieLens); this toy keeps only the shape, and every detail
below is a reconstruction. A catalogue holds items named by two attributes, a colour and a size (`g2`: green,
size 2). Each row's user has a hidden preferred item, shown only to the user simulator (`like g2`). The recommender
(`find`) may ask about an attribute (`c?` colour, `s?` size), which the user answers (`g`, `2`), and ends the dialogue
with a recommendation (`rec g2`); it may ask at most `max_questions` questions. The interaction rewards, coupled
(both from the same dialogue):

    recommender   hit = 1 when the recommended item is the hidden one, else 0
    user          t * (1 + hit) / 2, t = the share of its answers consistent with its hidden item (0 when it
                  answered nothing); a question it cannot answer has the consistent answer `?`

so the simulator cannot lie its way to a reward: any inconsistent answer lowers t, whatever the recommender does.
Self-distilled credit (`rlsd.coevolve`): the recommender's self-teacher is shown the hidden item (`[g2] find`), the
user's the dialogue's outcome (`[hit] like g2`). The warm start (one tiny Qwen2, copied into both agents) asks in
about half of its recommender turns and guesses otherwise, and answers truthfully in most user turns, so that both
agents have room to learn.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlsd.coevolve import Agent, CoEvolution, CoEvolveConfig
from rlsd.experiments.demo import DemoConfig, run_summary
from rlsd.experiments.task import leakage_rate
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2
from rlsd.experiments.warmstart import cached_warm_start, config_key, labelled_batch, supervised_warm_start

COARS_WARMSTART_FORMAT_VERSION = 1
"""Bump when the warm-start recipe changes in a way its configuration does not capture."""
RECOMMENDER, USER = "recommender", "user"
QUESTIONS = {"c?": 0, "s?": 1}
"""The recommender's questions and the attribute each asks about: the item name's first or second character."""
DEFAULT_CATALOGUE = tuple(colour + size for colour in "rgb" for size in "123")
"""Nine items, every colour with every size."""
TEACHER_TEMPLATE = "[{outcome}] {prompt}"


class RecommendationDialogue:
    """One dialogue's environment (`rlsd.coevolve.Interaction`): the user's hidden item, whose turn it is, the
    answers' consistency and the recommendation."""

    roles = (RECOMMENDER, USER)

    def __init__(self, catalogue: tuple[str, ...] = DEFAULT_CATALOGUE, max_questions: int = 2) -> None:
        if not catalogue:
            raise ValueError("the catalogue is empty: the recommender has nothing to recommend")
        bad = [item for item in catalogue if len(item) != len(QUESTIONS)]
        if bad:
            raise ValueError(f"catalogue items must be {len(QUESTIONS)} characters (colour, size), got {bad}")
        self.catalogue, self.max_questions = tuple(catalogue), max_questions
        self.item = ""
        self.questions: list[str] = []
        self.answers: list[bool] = []  # per user answer: whether it is consistent with the hidden item
        self.recommended: str | None = None
        self._waiting = RECOMMENDER

    def reset(self, row: dict[str, Any]) -> None:
        """Start a dialogue with the row's hidden `item` (which must be in the catalogue)."""
        item = row.get("item")
        if item not in self.catalogue:
            raise ValueError(f"the row's item {item!r} is not in the catalogue {', '.join(self.catalogue)}")
        self.item, self.questions, self.answers, self.recommended = item, [], [], None
        self._waiting = RECOMMENDER

    def prompt(self, role: str) -> str:
        """What the agent reads before the transcript: the user sees its hidden item, the recommender nothing."""
        return f"like {self.item}\n" if role == USER else "find\n"

    def header(self, role: str) -> str:
        return "U: " if role == USER else "R: "

    def next_role(self) -> str | None:
        return self._waiting

    def observe(self, role: str, text: str) -> None:
        """Record a turn: a recommendation ends the dialogue, a question hands the turn to the user (the question
        beyond `max_questions` ends it unanswered: a miss), an answer hands it back."""
        if role != self._waiting:
            raise ValueError(f"it is {self._waiting}'s turn, not {role}'s")
        text = text.strip()
        if role == USER:
            self.answers.append(text == self.consistent_answer(self.questions[-1]))
            self._waiting = RECOMMENDER
        elif text.startswith("rec "):
            self.recommended, self._waiting = text[4:].strip(), None
        else:
            self.questions.append(text)
            self._waiting = USER if len(self.questions) <= self.max_questions else None

    def consistent_answer(self, question: str) -> str:
        """The answer the hidden item implies: its attribute for a known question, `?` otherwise."""
        return self.item[QUESTIONS[question]] if question in QUESTIONS else "?"

    @property
    def hit(self) -> float:
        return float(self.recommended == self.item)

    @property
    def truthfulness(self) -> float:
        """The share of the user's answers consistent with its hidden item (0 when it answered nothing)."""
        return sum(self.answers) / len(self.answers) if self.answers else 0.0

    def rewards(self) -> dict[str, float]:
        """The coupled interaction rewards of both agents (module docstring)."""
        return {RECOMMENDER: self.hit, USER: self.truthfulness * (1.0 + self.hit) / 2.0}

    def privileged(self, role: str) -> str:
        """What each agent's self-teacher is shown: the hidden item (recommender), the outcome (user)."""
        if role == RECOMMENDER:
            return self.item
        return "hit" if self.hit else "miss"


def make_rows(count: int, seed: int, catalogue: tuple[str, ...] = DEFAULT_CATALOGUE) -> list[dict[str, str]]:
    """Rows of hidden items drawn uniformly from the catalogue."""
    if not catalogue:
        raise ValueError("the catalogue is empty: no row can hold a hidden item")
    rng = random.Random(seed)
    return [{"item": rng.choice(catalogue)} for _ in range(count)]


# ------------------------------------------------------------------------------------------------- the warm start
@dataclass(frozen=True)
class CoarsWarmStartConfig:
    """Everything that determines the warm start both agents copy; its hash names the cache entry."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    ask_share: float = 0.5  # recommender transcripts that ask both questions (the others guess an item at once)
    truth_share: float = 0.7  # user answers consistent with the hidden item (the others a random value)
    teacher_share: float = 0.3  # transcripts in the teacher format (the privileged outcome before the prompt)
    seed: int = 0

    def key(self) -> str:
        return config_key(COARS_WARMSTART_FORMAT_VERSION, asdict(self))


def scripted_turns(item: str, rng: random.Random, config: CoarsWarmStartConfig, shown: str | None) -> list:
    """A warm-start dialogue as (role, text) turns; `shown`: the role whose transcript is in the teacher format
    (the recommender shown the item recommends it, the user shown the outcome answers truthfully)."""
    values = ["rgb", "123"]
    answers = [item[k] if shown == USER or rng.random() < config.truth_share else rng.choice(values[k])
               for k in range(2)]  # fmt: skip
    if rng.random() < config.ask_share:
        turns = [(RECOMMENDER, "c?"), (USER, answers[0]), (RECOMMENDER, "s?"), (USER, answers[1])]
        return [*turns, (RECOMMENDER, "rec " + (item if shown == RECOMMENDER else "".join(answers)))]
    guess = item if shown == RECOMMENDER else rng.choice(DEFAULT_CATALOGUE)
    return [(RECOMMENDER, f"rec {guess}")]


def warm_example(tokenizer, item: str, role: str, rng: random.Random, config) -> tuple[list[int], list[int]]:
    """(ids, labels) of one transcript seen by `role`: only its own turns are scored, laid out as `rlsd.coevolve`
    lays out a dialogue (prompt, then header / turn + end-of-sequence / newline per turn)."""
    env = RecommendationDialogue()
    env.reset({"item": item})
    shown = rng.random() < config.teacher_share
    turns = scripted_turns(item, rng, config, role if shown else None)
    outcome = item if role == RECOMMENDER else ("hit" if turns[-1][1] == f"rec {item}" else "miss")
    prompt = TEACHER_TEMPLATE.format(outcome=outcome, prompt=env.prompt(role)) if shown else env.prompt(role)
    ids = _encode(tokenizer, prompt)
    labels = [-100] * len(ids)
    for speaker, text in turns:
        head, newline = _encode(tokenizer, env.header(speaker)), _encode(tokenizer, "\n")
        turn = [*_encode(tokenizer, text), tokenizer.eos_token_id]
        ids += head + turn + newline
        labels += [-100] * len(head) + (turn if speaker == role else [-100] * len(turn)) + [-100] * len(newline)
    return ids, labels


def train_coars_warm_start(config: CoarsWarmStartConfig, progress: bool = True):
    """Next-token cross-entropy on each role's own turns of scripted dialogues; the model, tokenizer, seconds."""
    start = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, intermediate_size=config.intermediate_size,
                             seed=config.seed)  # fmt: skip
    items, roles = DEFAULT_CATALOGUE, RecommendationDialogue.roles
    supervised_warm_start(
        model, config, lambda rng: warm_example(tokenizer, rng.choice(items), rng.choice(roles), rng, config),
        lambda rows: labelled_batch(rows, tokenizer.pad_token_id), "coars warm start", progress, scheduled=False,
    )  # fmt: skip
    return model, tokenizer, time.perf_counter() - start


def coars_warm_start(config: CoarsWarmStartConfig, progress: bool = True) -> Path:
    """Path of the warm start for `config`, trained and cached on first use."""
    return cached_warm_start("coars-warmstart", config, lambda: train_coars_warm_start(config, progress))


# ----------------------------------------------------------------------------------------------- the co-evolution
def build_coevolution(
    warm_path: Path,
    learning_rate: float,
    config: CoEvolveConfig,
    env_factory: Callable[[], RecommendationDialogue] = RecommendationDialogue,
) -> CoEvolution:
    """Both agents loaded from the warm start, each with its own AdamW."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    agents = {}
    for role in RecommendationDialogue.roles:
        model = AutoModelForCausalLM.from_pretrained(warm_path)
        agents[role] = Agent(model, torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0))
    return CoEvolution(agents, AutoTokenizer.from_pretrained(warm_path), env_factory, config)


@torch.no_grad()
def evaluate_coars(coevolution: CoEvolution, rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """One sampled dialogue (T = 1, seeded, the training RNG untouched) per held-out row between the two current
    agents: the recommender's hit rate (`pass_at_1`), the user's truthfulness (the share of all its answers that
    are consistent with its hidden item; 0 when it answered nothing), the share of dialogues with a question, leakage
    of the recommender's turns and the mean count of model tokens per dialogue."""
    with torch.random.fork_rng():
        torch.manual_seed(1_000 + seed)
        dialogues = coevolution.rollout(rows, group_size=1)
    decode = coevolution.tokenizer.decode
    recommender_texts = [decode([t for t, s in zip(d.ids, d.speakers, strict=True) if s == RECOMMENDER],
                                skip_special_tokens=True) for d in dialogues]  # fmt: skip
    return {
        "pass_at_1": statistics.mean(d.env.hit for d in dialogues),
        "truthfulness": sum(sum(d.env.answers) for d in dialogues)
        / max(1, sum(len(d.env.answers) for d in dialogues)),
        "ask_rate": statistics.mean(float(bool(d.env.questions)) for d in dialogues),
        "leakage_rate": leakage_rate(recommender_texts),
        "mean_length": statistics.mean(sum(s is not None for s in d.speakers) for d in dialogues),
    }


def coars_settings(config: DemoConfig) -> tuple[CoarsWarmStartConfig, CoEvolveConfig]:
    """The warm start and co-evolution settings for a bench run: the bench's model size and warm-start length,
    its completions per prompt as the group size."""
    warm = CoarsWarmStartConfig(hidden_size=config.warm.hidden_size, num_layers=config.warm.num_layers,
                                num_heads=config.warm.num_heads, intermediate_size=config.warm.intermediate_size,
                                steps=min(config.warm.steps, CoarsWarmStartConfig.steps), seed=0)  # fmt: skip
    return warm, CoEvolveConfig(group_size=config.num_generations, max_turns=6, max_new_tokens=8,
                                teacher_template=TEACHER_TEMPLATE, lam_decay_steps=0)  # fmt: skip


def train_coars(method: str, config: DemoConfig, record: Callable[[dict[str, Any]], None], progress: bool = True,
                learning_rate: float = 3e-4) -> dict[str, Any]:  # fmt: skip
    """`rlsd bench methods --methods coars`: co-evolve both agents for `config.steps` steps of
    `config.prompts_per_step` users x `config.num_generations` dialogues, recording held-out evaluations (the
    recommender's hit rate as `pass_at_1`) and per-step metrics in the bench's rows; returns the run's summary.
    The learning rate, 3e-4, is the better of two one-seed 60-step runs at the bench's size (1e-3 lost hit rate)."""
    warm, coevolve = coars_settings(config)
    torch.manual_seed(config.seed)
    coevolution = build_coevolution(coars_warm_start(warm, progress), learning_rate, coevolve)
    held_out = make_rows(min(config.eval_size, 200), seed=10_007)
    train_rows = make_rows(config.train_size, seed=config.seed)
    tag = {"method": method, "seed": config.seed}
    evals = [{"step": 0, **evaluate_coars(coevolution, held_out, config.seed)}]
    record({"kind": "eval", **tag, **evals[0]})
    seconds: list[float] = []
    began = last = time.perf_counter()

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal last
        seconds.append(time.perf_counter() - last)
        extra = {f"rlsd/{k}": metrics.get(f"{RECOMMENDER}/{k}") for k in ("clip_low_frac", "clip_high_frac")}
        record({"kind": "train", **tag, "step": step, **_finite(metrics), **_finite(extra)})
        if step % config.eval_every == 0 or step == config.steps:
            evals.append({"step": step, **evaluate_coars(coevolution, held_out, config.seed)})
            record({"kind": "eval", **tag, **evals[-1]})
        bar.update(1)
        last = time.perf_counter()

    with tqdm(total=config.steps, desc=f"{method} (seed {config.seed})", disable=not progress) as bar:
        coevolution.train(train_rows, config.steps, config.prompts_per_step, on_step)
    summary = run_summary(evals, seconds, time.perf_counter() - began)
    summary["final_truthfulness"] = evals[-1]["truthfulness"]
    summary["coars"] = {"warm_start": asdict(warm), "coevolve": asdict(coevolve), "learning_rate": learning_rate,
                        "eval_rows": len(held_out)}  # fmt: skip
    return summary


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (a metric over no token) as None, so that the rows stay strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
