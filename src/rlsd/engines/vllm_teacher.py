"""A vLLM-served teacher (`teacher_backend="vllm"`): the teacher's log-probs of the student's completions from vLLM's
`prompt_logprobs` on [teacher prompt ; completion], instead of a forward in the trainer.

The engine is TRL's colocated generation engine (`use_vllm=True, vllm_mode="colocate"`). TRL pushes the policy's
weights into it before every generation, so during a rollout it holds exactly the live self-teacher's weights
(`teacher="live"`); the teacher sees its own (privileged) prompt. vLLM's prompt log-probs give one log-prob per
position, of the token that is there, at temperature 1 (prompt tokens skip vLLM's sampling processors): enough for the
credit rules that read the teacher's log-probs of the sampled tokens (RLSD, OPSD, GEAR, RLCSD's contrast passes, ...),
not for what needs its whole next-token distribution (the distillation losses, the entropy rules), which is refused
by name. A synced or EMA teacher would need a second engine whose weights are pushed every `teacher_sync_steps`, an
external teacher an engine of its own: not implemented, refused by name.

The log-probs differ from the trainer's by the engines' numerics (vLLM's CPU backend runs a float32 checkpoint in
bfloat16): `tests/vllm_engine` measures the gap and what it does to RLSD's token advantages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlsd.core.rules import RULES
from rlsd.core.stages import STAGE_FIELDS, reachable, stage_values
from rlsd.infra.validate import ConfigError

BACKENDS = ("trainer", "vllm")
"""`teacher_backend`'s values."""
FULL_DISTRIBUTION_NEEDS = ("teacher_entropy",)
"""What a credit rule may read that one log-prob per sampled token cannot give."""


def check_served_teacher(config: Any) -> None:
    """`teacher_backend="vllm"` only where the colocated engine can serve the teacher: the live self-teacher, at
    temperature 1, with rules that read sampled-token log-probs only (every reachable stage); the rest refused by
    name."""
    flag = "--teacher_backend"
    if config.teacher_backend not in BACKENDS:
        raise ConfigError(flag, f"is {config.teacher_backend!r}", f"use one of {', '.join(BACKENDS)}")
    if config.teacher_backend == "trainer":
        return
    if not config.use_vllm or config.vllm_mode != "colocate":
        raise ConfigError(flag, "is 'vllm' without use_vllm=True in colocate mode",
                          "the teacher is served by TRL's colocated generation engine: set use_vllm=True and "
                          "vllm_mode='colocate', or teacher_backend='trainer'")  # fmt: skip
    if config.teacher_model is not None or config.teacher != "live":
        teacher = "an external teacher_model" if config.teacher_model is not None else f"teacher={config.teacher!r}"
        raise ConfigError(flag, f"is 'vllm' with {teacher}",
                          "only the live self-teacher is served (the generation engine holds its weights); a "
                          "synced, EMA, initial or external teacher would need an engine of its own, not implemented: "
                          "use teacher='live' or teacher_backend='trainer'")  # fmt: skip
    if config.temperature != 1.0:
        raise ConfigError(flag, f"is 'vllm' with temperature={config.temperature}",
                          "vLLM's prompt log-probs are at temperature 1 while the trainer's teacher divides its "
                          "logits by the temperature: use temperature=1.0 or teacher_backend='trainer'")  # fmt: skip
    for name in ("mad_opd_teachers", "teacher_rollout_loss"):
        if getattr(config, name) not in (None, [], "none"):
            raise ConfigError(flag, f"is 'vllm' with {name} set", "use teacher_backend='trainer'")
    base = {name: getattr(config, name) for name in STAGE_FIELDS}
    runs = [stage_values(config.stages, i, base) for i in reachable(config.stages)] if config.stages else [base]
    for values in runs:
        if values["distill_loss"] != "none":
            raise ConfigError(flag, f"is 'vllm' with distill_loss={values['distill_loss']!r}",
                              "a distillation loss reads the teacher's whole next-token distribution, a served "
                              "teacher gives one log-prob per sampled token: use a credit rule (credit='rlsd', ...) "
                              "or teacher_backend='trainer'")  # fmt: skip
        needs = [need for need in FULL_DISTRIBUTION_NEEDS if need in RULES[values["credit"]].needs]
        if needs:
            raise ConfigError(flag, f"is 'vllm' with credit={values['credit']!r}",
                              f"the rule reads {', '.join(needs)} (the teacher's whole distribution), a served "
                              "teacher gives one log-prob per sampled token: use a rule that reads only the "
                              "teacher's log-probs (rlsd, opsd, gear, ...) or teacher_backend='trainer'")  # fmt: skip


@dataclass(frozen=True)
class ServedTeacher:
    """The teacher's log-probs of completions from a vLLM engine's `prompt_logprobs`; `engine()` returns TRL's
    `VLLMGeneration` (its `llm`), read at each call since TRL builds it after the trainer's collaborators' inputs."""

    engine: Callable[[], Any]

    def __call__(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, T) float32: log p(y_t | teacher prompt, y_<t) of every completion token, 0 where `completion_mask` is
        0. Each row is sent as its unpadded [teacher prompt ; completion] (completions end at their first padding)."""
        from vllm import SamplingParams

        sequences = []
        for ids, mask, completion, kept in zip(prompt_ids, prompt_mask, completion_ids, completion_mask, strict=True):
            length = int(kept.sum())
            if not bool(kept[:length].all()):
                raise ValueError("a served teacher needs right-padded completions (a completion_mask of 1s then 0s)")
            sequences.append((ids[mask.bool()].tolist(), completion[:length].tolist()))
        engine = self.engine()
        longest = max((len(prompt) + len(completion) for prompt, completion in sequences), default=0)
        if engine.max_model_length is not None and longest > engine.max_model_length:
            raise ValueError(
                f"the served teacher's [teacher prompt ; completion] reaches {longest} tokens, beyond "
                f"vllm_max_model_length={engine.max_model_length}: raise it to cover the teacher prompt"
            )
        outputs = engine.llm.generate(
            [{"prompt_token_ids": prompt + completion} for prompt, completion in sequences],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )
        logps = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, ((prompt, completion), output) in enumerate(zip(sequences, outputs, strict=True)):
            scores = output.prompt_logprobs
            for t, token in enumerate(completion):
                logps[row, t] = scores[len(prompt) + t][token].logprob
        return logps.to(completion_ids.device)
