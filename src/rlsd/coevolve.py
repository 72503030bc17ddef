"""Several co-evolving policies on one interaction: CoARS (arXiv 2604.10029), reconstructed.

CoARS trains two agents, a recommender and a user simulator, on the dialogues they hold with each other. From the
paper's abstract (its full text was not available to this project) come the two ideas built here: an *interaction
reward*, coupled rewards for both agents derived from the same dialogue (here: the environment's `rewards()`, one
per role), and *self-distilled credit assignment*, which turns each agent's history into token credit under
teacher-student conditioning (here: the agent's own current weights, shown the dialogue's privileged outcome through
`teacher_template`, score the agent's turns; the project's credit rule, RLSD by default, turns the teacher-student
gap Delta_t and the agent's GRPO advantage A_i into token advantages A_it). Everything below the abstract's level is
a reconstruction: the turn-taking loop, one GRPO group per dialogue partner profile, one update per batch, each
agent updated only through its own loss.

A dialogue is a list of turns written into one transcript of token ids: the environment's header for the speaker
(`header(role)`, environment tokens), the speaker's generated turn (ending with its end-of-sequence token, the
speaker's tokens) and a newline (environment tokens). Agent X reads [X's prompt ; transcript] and its teacher reads
[teacher_template filled with X's prompt and X's privileged outcome ; transcript]; only X's tokens carry X's credit
and enter X's loss. The library never imports `rlsd.experiments`: the environment is any object with the
`Interaction` methods (`rlsd.experiments.coars_task` holds the embedded toy one).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from trl.trainer.utils import pad

from rlsd.context.templates import check_template_fields, render_teacher_prompt
from rlsd.core.credit import rlsd_lambda
from rlsd.core.prompt_selection import left_pad
from rlsd.core.rollout_losses import completion_mask
from rlsd.core.rules import RuleParams, Signals, get_rule
from rlsd.step.near_future import group_advantages
from rlsd.step.scoring import score_tokens

CHECKPOINT_FILE = "coevolve.pt"
"""The file `CoEvolution.save` writes into a checkpoint folder."""

CPU = torch.device("cpu")
"""Where the padded batches are built (the models run on the CPU)."""


SIGNALS = frozenset(
    {"seq_advantages", "mask", "teacher_logps", "student_logps", "group_ids", "step_ids", "vocab_size"}
)
"""The credit rules' signals (`rlsd.core.rules.Signals`) a co-evolution step fills."""


class InteractionError(RuntimeError):
    """An environment failed or broke the protocol; the message names the row and the turn."""


class Interaction(Protocol):
    """One dialogue's environment: whose turn it is, what each agent reads, and the interaction rewards."""

    roles: tuple[str, ...]

    def reset(self, row: dict[str, Any]) -> None: ...
    def prompt(self, role: str) -> str: ...
    def next_role(self) -> str | None: ...
    def header(self, role: str) -> str: ...
    def observe(self, role: str, text: str) -> None: ...
    def rewards(self) -> dict[str, float]: ...
    def privileged(self, role: str) -> str: ...


@dataclass
class Agent:
    """One co-evolving policy and its own optimizer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class CoEvolveConfig:
    """The knobs of a co-evolution step (the same for every agent)."""

    group_size: int = 4  # dialogues per row: one GRPO group per agent
    max_turns: int = 8  # a dialogue the environment has not ended after this many turns is refused
    max_new_tokens: int = 8  # per turn
    temperature: float = 1.0
    credit: str = "rlsd"  # any registered rule (`rlsd.core.rules`); "grpo" drops the self-teacher
    lam: float = 0.5  # RLSD's lam_0
    lam_decay_steps: int = 0  # 0: constant lam (`rlsd.core.credit.rlsd_lambda`)
    clip: float = 0.2  # RLSD's eps_w
    scale_rewards: str = "group"
    teacher_template: str = "[{outcome}] {prompt}"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.max_turns < 1 or self.max_new_tokens < 1:
            raise ValueError("group_size must be >= 2, max_turns and max_new_tokens >= 1")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        unmet = sorted(get_rule(self.credit).needs - SIGNALS)
        if unmet:
            raise ValueError(f"credit={self.credit!r} needs {unmet}, which co-evolution does not compute")
        if self.uses_teacher:
            check_template_fields(self.teacher_template, "outcome", ("outcome",), ("prompt", "outcome"), ("prompt",))

    @property
    def uses_teacher(self) -> bool:
        """Whether the credit rule reads the self-teacher's log-probs."""
        return "teacher_logps" in get_rule(self.credit).needs


@dataclass
class Dialogue:
    """One played dialogue: its row, its environment and the transcript with, per token, its speaker (None: the
    environment) and the index of that speaker's turn."""

    row_index: int
    env: Interaction
    ids: list[int] = field(default_factory=list)
    speakers: list[str | None] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)
    spoken: dict[str, int] = field(default_factory=dict)

    def add(self, ids: list[int], speaker: str | None) -> None:
        """Append tokens of `speaker` (None: the environment); a speaker's tokens carry the index of its turn."""
        turn = self.spoken.get(speaker, 0) if speaker is not None else 0
        self.ids += ids
        self.speakers += [speaker] * len(ids)
        self.turns += [turn] * len(ids)
        if speaker is not None:
            self.spoken[speaker] = turn + 1


class CoEvolution:
    """Co-evolving agents on one interaction: roll dialogues out, score each agent's credit, update each agent from
    its own loss, and checkpoint every policy, optimizer, the RNG and the step."""

    def __init__(
        self,
        agents: dict[str, Agent],
        tokenizer: Any,
        env_factory: Callable[[], Interaction],
        config: CoEvolveConfig | None = None,
    ) -> None:
        if len(agents) < 2:
            raise ValueError(f"co-evolution needs at least two agents, got {sorted(agents)}")
        self.agents, self.tokenizer, self.env_factory = agents, tokenizer, env_factory
        self.config = config or CoEvolveConfig()
        self.step = 0
        roles = tuple(self._make_env().roles)
        if set(roles) != set(agents):
            raise ValueError(f"the environment's roles {roles} are not the agents {tuple(agents)}")

    # ------------------------------------------------------------------------------------------- the dialogues
    def rollout(self, rows: Sequence[dict[str, Any]], group_size: int | None = None) -> list[Dialogue]:
        """`group_size` (default the config's) sampled dialogues per row, consecutive, played turn by turn, each
        agent generating its turns for every dialogue that waits on it in one batch."""
        dialogues = []
        for index, row in enumerate(rows):
            for _ in range(group_size or self.config.group_size):
                env = self._make_env()
                _call(lambda env=env, row=row: env.reset(dict(row)), f"reset failed for row {index}")
                dialogues.append(Dialogue(index, env))
        counts = [0] * len(dialogues)
        while True:
            waiting: dict[str, list[int]] = {}
            for i, dialogue in enumerate(dialogues):
                where = f"next_role failed for row {dialogue.row_index}, turn {counts[i]}"
                role = _call(dialogue.env.next_role, where)
                if role is None:
                    continue
                if role not in self.agents:
                    raise InteractionError(f"row {dialogue.row_index}, turn {counts[i]}: unknown role {role!r}")
                if counts[i] >= self.config.max_turns:
                    raise InteractionError(f"row {dialogue.row_index}: the dialogue did not end within max_turns="
                                           f"{self.config.max_turns} turns")  # fmt: skip
                waiting.setdefault(role, []).append(i)
            if not waiting:
                break
            for role, members in waiting.items():
                self._play_turn(role, [dialogues[i] for i in members], [counts[i] for i in members])
                for i in members:
                    counts[i] += 1
        for dialogue in dialogues:
            where = f"rewards failed for row {dialogue.row_index}"
            dialogue.rewards = dict(_call(dialogue.env.rewards, where))
            missing = set(self.agents) - set(dialogue.rewards)
            if missing:
                raise InteractionError(f"row {dialogue.row_index}: rewards() has no reward for {sorted(missing)}")
        return dialogues

    def _play_turn(self, role: str, dialogues: list[Dialogue], counts: list[int]) -> None:
        """One turn of `role` in each of `dialogues`: header, the generated turn, newline; the environment observes."""
        header = [self._encode(d.env.header(role)) for d in dialogues]
        prompts = [self._encode(d.env.prompt(role)) + d.ids + h for d, h in zip(dialogues, header, strict=True)]
        turns = generate_turns(self.agents[role].model, self.tokenizer, prompts, self.config.max_new_tokens,
                               self.config.temperature)  # fmt: skip
        newline = self._encode("\n")
        for dialogue, head, turn, count in zip(dialogues, header, turns, counts, strict=True):
            dialogue.add(head, None)
            dialogue.add(turn, role)
            dialogue.add(newline, None)
            text = self.tokenizer.decode(turn, skip_special_tokens=True)
            _call(lambda d=dialogue, t=text: d.env.observe(role, t),
                  f"observe failed for row {dialogue.row_index}, turn {count} ({role})")  # fmt: skip

    # ----------------------------------------------------------------------------------------------- the credit
    def batch(self, role: str, dialogues: list[Dialogue]) -> dict[str, Tensor]:
        """Agent `role`'s view of the dialogues: its prompts, its teacher's prompts, the transcripts (right-padded),
        its token mask, its turn index per token, its rewards and group ids."""
        enc = self._encode
        prompts = [enc(d.env.prompt(role)) for d in dialogues]
        teacher = [
            enc(render_teacher_prompt(d.env.prompt(role), self.config.teacher_template,
                                      outcome=_call(lambda d=d: d.env.privileged(role),
                                                    f"privileged failed for row {d.row_index} ({role})")))
            for d in dialogues
        ] if self.config.uses_teacher else prompts  # fmt: skip
        pad_id = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, CPU)
        teacher_ids, teacher_mask = left_pad(teacher, pad_id, CPU)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "teacher_ids": teacher_ids,
            "teacher_mask": teacher_mask,
            "ids": pad([torch.tensor(d.ids) for d in dialogues], padding_value=pad_id),
            "valid": pad([torch.ones(len(d.ids), dtype=torch.long) for d in dialogues], padding_value=0),
            "mask": pad([torch.tensor([s == role for s in d.speakers], dtype=torch.long) for d in dialogues],
                        padding_value=0),
            "step_ids": pad([torch.tensor(d.turns) for d in dialogues], padding_value=0),
            "rewards": torch.tensor([d.rewards[role] for d in dialogues], dtype=torch.float32),
            "group_ids": torch.tensor([d.row_index for d in dialogues]),
        }  # fmt: skip

    def credit(self, role: str, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        """Agent `role`'s token advantages: GRPO advantages of its interaction rewards within each group, turned
        into token credit by the configured rule from its self-teacher's and its own log-probs on its tokens."""
        config, model = self.config, self.agents[role].model
        advantages = group_advantages(batch["rewards"], config.group_size, config.scale_rewards)
        signals = Signals(advantages, batch["mask"], group_ids=batch["group_ids"], step_ids=batch["step_ids"],
                          vocab_size=len(self.tokenizer))  # fmt: skip
        if config.uses_teacher:
            rows = batch["ids"].size(0)
            common = {"temperature": config.temperature, "batch_size": rows}
            signals.student_logps = score_tokens(model, batch["prompt_ids"], batch["prompt_mask"], batch["ids"],
                                                 batch["valid"], **common).logps  # fmt: skip
            signals.teacher_logps = score_tokens(model, batch["teacher_ids"], batch["teacher_mask"], batch["ids"],
                                                 batch["valid"], **common).logps  # fmt: skip
        lam = rlsd_lambda(step, lam0=config.lam, decay_steps=config.lam_decay_steps)
        return get_rule(config.credit).fn(signals, RuleParams(lam=lam, clip=config.clip))

    def loss(self, role: str, batch: dict[str, Tensor], token_advantages: Tensor) -> Tensor:
        """The policy-gradient loss of agent `role`: minus the token mean of A_it * log p(token) over its tokens
        (the clipped surrogate at ratio 1: one update per batch, so the policy that sampled is the one updated)."""
        logps = token_logps(self.agents[role].model, batch["prompt_ids"], batch["prompt_mask"], batch["ids"],
                            batch["valid"], self.config.temperature)  # fmt: skip
        mask = batch["mask"].float()
        return -(token_advantages.float() * logps * mask).sum() / mask.sum().clamp(min=1.0)

    # ------------------------------------------------------------------------------------------------ a step
    def train_step(self, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        """One co-evolution step: dialogues for `rows`, then each agent's credit, loss and update (its own
        optimizer); returns each agent's mean reward, loss and credit metrics, prefixed by its role."""
        step = self.step + 1
        dialogues = self.rollout(rows)
        metrics: dict[str, float] = {}
        for role, agent in self.agents.items():
            batch = self.batch(role, dialogues)
            advantages, credit_metrics = self.credit(role, batch, step)
            metrics[f"{role}/reward"] = float(batch["rewards"].mean())
            metrics[f"{role}/tokens"] = float(batch["mask"].sum())
            metrics.update({f"{role}/{key}": float(value) for key, value in credit_metrics.items()})
            if not batch["mask"].any():
                continue  # no token of this agent in any dialogue: nothing to learn, the optimizer is left as is
            agent.model.train()
            loss = self.loss(role, batch, advantages)
            agent.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.model.parameters(), self.config.max_grad_norm)
            agent.optimizer.step()
            agent.optimizer.zero_grad(set_to_none=True)
            metrics[f"{role}/loss"] = float(loss.detach())
        self.step = step
        return metrics

    def train(self, rows: Sequence[dict[str, Any]], steps: int, per_step: int,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              checkpoint_dir: str | None = None, save_every: int = 0) -> None:  # fmt: skip
        """Steps `self.step + 1 .. steps`, step k on rows [(k-1) * per_step, k * per_step) of `rows` (cycled, so that
        a resumed run reads the same rows); `on_step(k, metrics)` after each; a checkpoint every `save_every`."""
        if not rows:
            raise ValueError("co-evolution needs at least one row")
        while self.step < steps:
            start = self.step * per_step
            metrics = self.train_step([rows[(start + i) % len(rows)] for i in range(per_step)])
            if on_step is not None:
                on_step(self.step, metrics)
            if checkpoint_dir and save_every and self.step % save_every == 0:
                self.save(checkpoint_dir)

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every policy's and optimizer's state, the step and the RNG states (sampling reads torch's CPU RNG)."""
        return {
            "step": self.step,
            "policies": {role: agent.model.state_dict() for role, agent in self.agents.items()},
            "optimizers": {role: agent.optimizer.state_dict() for role, agent in self.agents.items()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a checkpoint of other agents is refused, naming them."""
        if set(state["policies"]) != set(self.agents) or set(state["optimizers"]) != set(self.agents):
            raise ValueError(f"checkpoint holds agents {sorted(state['policies'])}, this run {sorted(self.agents)}")
        for role, agent in self.agents.items():
            agent.model.load_state_dict(state["policies"][role])
            agent.optimizer.load_state_dict(state["optimizers"][role])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])

    def save(self, folder: str) -> str:
        """Write the state into `folder/coevolve.pt` atomically (a temporary file renamed into place)."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CHECKPOINT_FILE)
        torch.save(self.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    def load(self, folder: str) -> None:
        """Resume from `folder/coevolve.pt` (written by `save`)."""
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no co-evolution checkpoint at {path}")
        self.load_state_dict(torch.load(path, weights_only=False))

    # ------------------------------------------------------------------------------------------------ helpers
    def _make_env(self) -> Interaction:
        return _call(self.env_factory, "the environment factory failed")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_turns(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                   temperature: float) -> list[list[int]]:  # fmt: skip
    """One sampled turn per prompt (left-padded, T = `temperature`, no top-k / top-p), cut after its first
    end-of-sequence token (kept)."""
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, CPU)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train(was_training)
    completion = out[:, ids.size(1) :]
    keep = completion_mask(completion, [tokenizer.eos_token_id]).bool()
    return [row[kept].tolist() for row, kept in zip(completion, keep, strict=True)]


def token_logps(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor,
                temperature: float) -> Tensor:  # fmt: skip
    """(B, T) log p(token) of `ids` after the prompts, with gradients (the forward `score_tokens` runs without)."""
    logits = model(input_ids=torch.cat([prompt_ids, ids], 1), attention_mask=torch.cat([prompt_mask, mask], 1),
                   use_cache=False).logits[:, prompt_ids.size(1) - 1 : -1]  # fmt: skip
    logps = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~mask.bool(), 0.0)


def _call(fn: Callable[[], Any], where: str) -> Any:
    """`fn()`, an exception re-raised as an `InteractionError` that says where (row, turn, role)."""
    try:
        return fn()
    except InteractionError:
        raise
    except Exception as err:
        raise InteractionError(f"environment: {where}: {type(err).__name__}: {err}") from err
