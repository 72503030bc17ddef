"""A vLLM-served teacher (`teacher_backend="vllm"`): the teacher's log-probs of the student's completions from vLLM's
`prompt_logprobs` on [teacher prompt ; completion], instead of a forward in the trainer.

Which engine serves it: the live self-teacher (`teacher="live"`) is TRL's colocated generation engine (`use_vllm=True,
vllm_mode="colocate"`), which TRL pushes the policy's weights into before every generation. A teacher with weights of
its own has an engine of its own (`TeacherEngine`, TRL's `VLLMGeneration` built on the teacher's model): an external
teacher's (`teacher_model`) loads its folder; a synced, EMA or initial copy's loads the policy's folder and is pushed
the trainer's copy through TRL's `sync_weights` (the generation engine's weight-load path) at the first teacher pass
after each change of the copy (its `last_sync_step`: every `teacher_sync_steps` for `synced`, every step for `ema`).
The trainer keeps its own copy (or external model), the source of the pushes: the engine replaces its scoring forward,
not its memory. The teacher sees its own (privileged) prompt.

vLLM's prompt log-probs give one log-prob per position, of the token that is there, at temperature 1 (prompt tokens
skip vLLM's sampling processors): enough for the credit rules that read the teacher's log-probs of the sampled tokens
(RLSD, OPSD, GEAR, RLCSD's contrast passes, ...), not for what needs its whole next-token distribution (the
distillation losses, the entropy rules), which is refused by name.

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
from rlsd.teachers.base import EXTERNAL_TEACHER

BACKENDS = ("trainer", "vllm")
"""`teacher_backend`'s values."""
FULL_DISTRIBUTION_NEEDS = ("teacher_entropy",)
"""What a credit rule may read that one log-prob per sampled token cannot give."""
SERVED_KINDS = ("live", "synced", "ema", "initial", EXTERNAL_TEACHER)
"""The teacher kinds a vLLM engine can serve: the live teacher (the generation engine), a copy of the policy pushed
into an engine of its own, an external model loaded by one."""


def check_served_teacher(config: Any) -> None:
    """`teacher_backend="vllm"` only where a colocated engine can serve the teacher: a kind of `SERVED_KINDS`, at
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
    kind = EXTERNAL_TEACHER if config.teacher_model is not None else config.teacher
    if kind not in SERVED_KINDS:
        raise ConfigError(flag, f"is 'vllm' with teacher={kind!r}",
                          f"a vLLM engine serves the teacher kinds {', '.join(SERVED_KINDS)} (weights it can "
                          "load or be pushed); use one of them or teacher_backend='trainer'")  # fmt: skip
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
    `VLLMGeneration` (its `llm`), read at each call since TRL builds the generation engine after the trainer's
    collaborators' inputs; `follow()` (a teacher engine of its own) first pushes the teacher's weights if they
    changed."""

    engine: Callable[[], Any]
    follow: Callable[[], bool] | None = None

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

        if self.follow is not None:
            self.follow()
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
            scores = output.prompt_logprobs[len(prompt) :]  # one per completion token, the token's own
            logps[row, : len(completion)] = torch.tensor(
                [score[token].logprob for score, token in zip(scores, completion, strict=True)]
            )
        return logps.to(completion_ids.device)


@dataclass
class TeacherEngine:
    """A vLLM engine of a teacher with weights of its own: TRL's `VLLMGeneration` built on the teacher's model, which
    loads that model's folder. A copy of the policy (`pushes`) is pushed the trainer's copy through TRL's
    `sync_weights` whenever the copy changed since the last push (its `last_sync_step`; the first call always
    pushes); an external model is frozen and never pushed."""

    generation: Any  # TRL's `VLLMGeneration` over the teacher's model (`llm`, `max_model_length`, `sync_weights`)
    teacher: Any  # the trainer's teacher (`model`, `last_sync_step`): the source of the pushes
    pushes: bool
    pushed_step: int | None = None  # the teacher's `last_sync_step` at the last push, None before the first

    def __call__(self) -> Any:
        """The engine, as `ServedTeacher.engine` reads it."""
        return self.generation

    def follow(self) -> bool:
        """Push the teacher's weights if they changed since the last push; True when it pushed."""
        if not self.pushes or self.teacher.last_sync_step == self.pushed_step:
            return False
        self.generation.model = self.teacher.model  # the module the trainer holds now (placed, maybe reloaded)
        self.generation.sync_weights()
        self.pushed_step = self.teacher.last_sync_step
        return True


def start_teacher_engine(args: Any, teacher: Any, accelerator: Any, processing_class: Any) -> TeacherEngine:
    """A `TeacherEngine` for `teacher` (a copy of the policy or an external model), with the generation engine's
    colocate settings (`vllm_*`, one sequence per row of TRL's generation batch), without sleep mode (its weights
    must stay loaded between pushes)."""
    from trl.generation.vllm_generation import VLLMGeneration

    if teacher.model is None:
        raise ConfigError("--teacher_backend", f"is 'vllm' with teacher={teacher.mode!r} on a PEFT policy",
                          "the teacher is an adapter, not a model an engine can load or be pushed: merge it, use "
                          "teacher='live' or teacher_backend='trainer'")  # fmt: skip
    generation = VLLMGeneration(
        model=teacher.model, accelerator=accelerator, processing_class=processing_class, mode="colocate",
        tensor_parallel_size=args.vllm_tensor_parallel_size, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation,
        model_impl=args.vllm_model_impl, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    return TeacherEngine(generation, teacher, pushes=teacher.mode != EXTERNAL_TEACHER)


def served_teacher(args: Any, teacher: Any, generation: Callable[[], Any], accelerator: Any, processing_class: Any,
                   *, sharded: bool) -> ServedTeacher | None:  # fmt: skip
    """The scorer's served teacher of a run (None with `teacher_backend="trainer"` or no teacher): the live teacher
    from the generation engine (`generation()`, TRL's `vllm_generation`), any other kind (`SERVED_KINDS`, checked by
    the config) from an engine of its own (`start_teacher_engine`), refused under FSDP / DeepSpeed (never run)."""
    if args.teacher_backend != "vllm" or teacher is None:
        return None
    if teacher.mode == "live":
        return ServedTeacher(generation)
    if sharded:
        raise ConfigError("--teacher_backend", f"is 'vllm' with teacher={teacher.mode!r} under FSDP or DeepSpeed",
                          "a teacher engine of its own was only run on one process: use teacher='live' or "
                          "teacher_backend='trainer'")  # fmt: skip
    engine = start_teacher_engine(args, teacher, accelerator, processing_class)
    return ServedTeacher(engine, follow=engine.follow)
