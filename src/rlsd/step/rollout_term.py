"""Loss terms beside TRL's policy loss that learn from teacher-generated trajectories (`teacher_rollout_loss`).

After TRL's rollout the teacher generates N completions per prompt (`TeacherSamples`); the run's loss term turns them
into per-row tensors (`LossTerm.add`), which travel to the loss in `RLSDEntries.term`, and at loss time computes the
micro-batch's term from them (`LossTerm.term`); `teacher_rollout_coef` times it is added to the policy loss.

- `@loss_term(name, knobs=..., default_coef=...)` registers a `LossTerm` class: its name becomes a value of
  `teacher_rollout_loss`, each knob (`rlsd.core.rules.Knob`) an `RLSDConfig` field, `default_coef` the coefficient when
  left unset. Adding a term is one decorated class, here or in user code.
- `TeacherRollouts`, the context the trainer builds once from values and callables (never the trainer: the TRL
  attributes and methods behind them are read where the trainer builds it, `rlsd.trainer`'s seams table), holds what
  the terms share: the teacher's generation, the trajectories' scoring, BRTS's candidates and answer prompts.
- `TeacherRolloutTerm` is what the trainer calls: the registered term of the run over that context.
- BRTS and PBSD are the two registered terms; their math is in `rlsd.core.rollout_losses`.

`rlsd.config` reads this registry, so this module does not import it: `args` is the run's `RLSDConfig`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from accelerate import Accelerator
from torch import Tensor
from trl.trainer.utils import pad

from rlsd.context.sources import AnswerSource, PrivilegedSource, RolloutView
from rlsd.context.templates import render_teacher_prompts
from rlsd.core.credit import TokenMean
from rlsd.core.distill import LOSS_KNOBS, head_logits
from rlsd.core.rollout_losses import (
    Candidates,
    chunked_topk_kl,
    completion_mask,
    distinct_rows,
    pair_index,
    pbsd_loss,
    select_brts,
    select_rollout,
    teacher_topk,
    trajectory_alignment,
)
from rlsd.core.rules import KNOBS, Knob, declare_knobs
from rlsd.data.rewards import reward_totals
from rlsd.infra.guards import check_plain_lm_head
from rlsd.infra.validate import ConfigError
from rlsd.step.batch import RLSDEntries, loss_mask
from rlsd.step.scoring import ScoreResult
from rlsd.teachers import backbone_and_head

TokenizePrompts = Callable[[list[Any]], tuple[list[list[int]], Any, Any]]
"""TRL's `_tokenize_prompts`: prompts rendered and tokenized as the rollout does -> (ids, images, fields)."""
TeacherPrompts = Callable[[list[dict[str, Any]], dict[str, Any], str, torch.Tensor], tuple[Any, ...]]
"""The trainer's `teacher_inputs(inputs, output, mode, rows)`: those rows' teacher prompts (ids, mask, ...)."""
ScoringModel = Callable[[str], contextlib.AbstractContextManager[torch.nn.Module]]
"""`Scorer.scoring_model(which)`: the module that scores for "teacher" or "student", for a `with` block."""
TrlLogps = Callable[..., tuple[torch.Tensor, torch.Tensor | None, Any]]
"""TRL's own `_get_per_token_logps_and_entropies` (model, input_ids, attention_mask, logits_to_keep, batch_size)."""
TrlRewards = Callable[[list[dict[str, Any]], list[Any], list[Any], list[list[int]]], torch.Tensor]
"""TRL's own `_calculate_rewards` (inputs, prompts, completions, completion_ids) -> (B_global, n_funcs), collective."""


# ---------------------------------------------------------------------------------------------- the context
@dataclass(frozen=True)
class TeacherSamples:
    """One training rollout's teacher trajectories on this process: N per local prompt (a group's first local row),
    prompt-major, and what maps them to the rollout's rows. Every process holds the same number of prompts (topped
    up with its last one), so that collectives (reward gathering) stay in step."""

    inputs: list[dict[str, Any]]  # this process's dataset rows, as TRL's rollout got them (B)
    output: dict[str, Any]  # TRL's rollout batch (prompt_ids / prompt_mask, completion_ids / completion_mask, ...)
    group_size: int  # completions per prompt
    positions: Tensor  # (B,) each row's position in the global batch
    firsts: list[int]  # each local prompt's first row: the prompts the teacher rolls out from
    row_prompt: Tensor  # (B,) each row's prompt, an index into `firsts`
    prompt_rows: Tensor  # (P,) the rows whose prompts were rolled out: `firsts`, topped up with its last
    teacher_ids: Tensor  # (P, Lp) their teacher prompts, left-padded
    teacher_mask: Tensor  # (P, Lp)
    plain: tuple[Tensor, Tensor]  # (P, Ls) each: their plain (student) prompt ids and mask
    ids: Tensor  # (P * N, L) the teacher's completions, pad after the first EOS
    mask: Tensor  # (P * N, L)
    n: int  # N, `teacher_rollouts`

    @property
    def count(self) -> int:
        """P: the prompts rolled out on every process (this process's own are the first `len(firsts)`)."""
        return len(self.prompt_rows)


@dataclass(frozen=True, kw_only=True)
class TeacherRollouts:
    """What the teacher-rollout terms share, built once by the trainer from what these read (`args` is read at each
    call): the teacher's generation of each rollout (`samples`, `generate`), no-grad scoring of trajectories
    (`trajectory_pass`), BRTS-style candidates with rewards and alignment (`candidates`) and answer-shown teacher
    prompts (`answer_prompts`)."""

    accelerator: Accelerator
    args: Any  # the run's `RLSDConfig`
    source: PrivilegedSource  # the run's privileged source: BRTS retries only when its prompts lack the answer
    tokenizer: Any  # the text tokenizer (pad id, decoding the trajectories for the reward functions)
    generation_config: Any  # TRL's `GenerationConfig`: the teacher samples with the run's settings
    eos_token_ids: list[int]  # the ids that end a completion
    temperature: float  # divides the logits of every scoring forward
    reward_weights: torch.Tensor  # the reward functions' weights in the total
    tokenize_prompts: TokenizePrompts
    teacher_inputs: TeacherPrompts
    scoring_model: ScoringModel
    score: Callable[..., ScoreResult]  # `Scorer.score` (the rule pass's scorer)
    trl_logps: TrlLogps
    trl_rewards: TrlRewards
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    group_size: Callable[[], int]  # completions per prompt in the current mode
    scoring_batch_size: Callable[[], int]  # rows per no-grad forward in the current mode
    training: Callable[[], bool]  # whether the policy is in training mode
    accumulation: Callable[[], int]  # HF's `current_gradient_accumulation_steps`

    def samples(self, inputs: list[dict[str, Any]], output: dict[str, Any], mode: str) -> TeacherSamples:
        """The teacher's N = `teacher_rollouts` completions for each of this process's prompts (a group's first local
        row), from its teacher prompt; every process rolls out as many prompts as the one with the most."""
        group_size, local_rows = self.group_size(), len(inputs)
        positions = torch.arange(local_rows) + self.accelerator.process_index * local_rows
        groups = (positions // group_size).tolist()
        firsts = [i for i in range(local_rows) if i == 0 or groups[i] != groups[i - 1]]
        row_prompt = torch.tensor([len([f for f in firsts if f <= i]) - 1 for i in range(local_rows)])
        count = int(self.accelerator.gather(torch.tensor([len(firsts)], device=self.accelerator.device)).max())
        prompt_rows = torch.tensor(firsts + [firsts[-1]] * (count - len(firsts)))
        teacher_ids, teacher_mask, _, _ = self.teacher_inputs(inputs, output, mode, prompt_rows)
        n = self.args.teacher_rollouts
        ids, mask = self.generate(teacher_ids, teacher_mask, n)
        plain = (output["prompt_ids"][prompt_rows], output["prompt_mask"][prompt_rows])
        return TeacherSamples(inputs, output, group_size, positions, firsts, row_prompt, prompt_rows, teacher_ids,
                              teacher_mask, plain, ids, mask, n)  # fmt: skip

    def answer_prompts(self, inputs: list[dict[str, Any]], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher prompts of `rows` with the reference answer shown: the `"answer"` source's template (the run's
        own with that source), tokenized and left-padded (BRTS's retry)."""
        template = self.args.teacher_template if self.args.privileged_source == "answer" else None
        fields = AnswerSource(self.args).context(RolloutView(inputs, self.group_size()), rows.tolist()).fields
        prompts = [inputs[i]["prompt"] for i in rows.tolist()]
        ids_list, _, _ = self.tokenize_prompts(
            render_teacher_prompts(prompts, template or AnswerSource.default_template, fields)
        )
        device = self.accelerator.device
        ids = pad([torch.tensor(x) for x in ids_list], padding_value=self.tokenizer.pad_token_id, padding_side="left")
        mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids_list], padding_value=0, padding_side="left")
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N sampled completions per left-padded prompt from the teacher (transformers `generate` with TRL's
        generation config: the run's temperature, top_p, top_k, max_completion_length), (P * N, L) ids (pad after
        the first EOS) and mask, prompt-major."""
        ids, mask = prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0)
        with self.scoring_model("teacher") as teacher:
            sequences = self.accelerator.unwrap_model(teacher).generate(
                input_ids=ids, attention_mask=mask, generation_config=self.generation_config
            )
        completion = sequences[:, ids.size(1) :]
        keep = completion_mask(completion, self.eos_token_ids)
        return completion.masked_fill(keep == 0, self.tokenizer.pad_token_id), keep

    def student_states(self, model: torch.nn.Module, inputs: dict, values: dict, rows: torch.Tensor) -> tuple:
        """The student's forward (with gradient, backbone under autocast as TRL's loss runs) on [plain prompt ;
        trajectory] of `rows`: their ids, token mask, hidden states before each token, and the head's logits."""
        ids, mask = values["ids"][rows], values["mask"][rows]
        backbone, head = backbone_and_head(self.accelerator.unwrap_model(model))
        with self.accelerator.autocast():
            output = backbone(input_ids=torch.cat([inputs["prompt_ids"][rows], ids], dim=1),
                              attention_mask=torch.cat([inputs["prompt_mask"][rows], mask], dim=1))  # fmt: skip
        states = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return ids, mask.bool(), states[:, -ids.size(1) - 1 : -1], head_logits(head, self.temperature)

    @torch.no_grad()
    def trajectory_pass(
        self,
        which: str,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        k: int | None,
    ) -> list[torch.Tensor]:
        """One no-grad forward of `which` ("teacher" or "student") on [prompt ; trajectory], chunked by the
        per-device batch: the sampled tokens' log-probs (R, L), and with `k` the top-k log-probs and ids (R, L, k)."""
        if k is None:  # the sampled tokens only: TRL's scoring forward (fused head, the model's logit scaling)
            with self.scoring_model(which) as scoring:
                logps, _, _ = self.trl_logps(
                    scoring, torch.cat([prompt_ids, ids], dim=1), torch.cat([prompt_mask, mask], dim=1),
                    ids.size(1), batch_size=self.scoring_batch_size(),
                )  # fmt: skip
            return [logps]
        pieces = []
        batch = self.scoring_batch_size()
        with self.scoring_model(which) as scoring, self.accelerator.autocast():
            model = self.accelerator.unwrap_model(scoring)
            for start in range(0, ids.size(0), batch):
                rows = slice(start, start + batch)
                out = model(
                    input_ids=torch.cat([prompt_ids[rows], ids[rows]], dim=1),
                    attention_mask=torch.cat([prompt_mask[rows], mask[rows]], dim=1),
                    logits_to_keep=ids.size(1) + 1,
                )
                logits = out.logits[:, :-1].float() / self.temperature
                sampled = torch.log_softmax(logits, dim=-1).gather(-1, ids[rows].unsqueeze(-1)).squeeze(-1)
                pieces.append((sampled, *(teacher_topk(logits, k) if k else ())))
        return [torch.cat(parts) for parts in zip(*pieces, strict=True)]

    def candidates(
        self,
        inputs: list[dict[str, Any]],
        prompt_rows: torch.Tensor,
        plain: tuple[torch.Tensor, torch.Tensor],
        teacher_ids: torch.Tensor,
        teacher_mask: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> Candidates:
        """N = `teacher_rollouts` teacher trajectories per prompt (`ids`, prompt-major) scored as BRTS chooses among
        them: the teacher's top-K (K = `distill_overlap_k`) on them, the student's alignment with it (the student on
        the plain prompt) and their weighted total rewards from the run's reward functions (TRL's
        `_calculate_rewards`, gathered over processes, a collective; NaN when every function abstains)."""
        k, n = self.args.distill_overlap_k, self.args.teacher_rollouts
        index = torch.arange(ids.size(0), device=ids.device) // n  # each trajectory's prompt
        _, top_logps, top_ids = self.trajectory_pass("teacher", teacher_ids[index], teacher_mask[index], ids, mask, k)
        student_ids = self.trajectory_pass("student", plain[0][index], plain[1][index], ids, mask, k)[2]
        alignment = trajectory_alignment(student_ids, top_ids, mask)
        rows = [inputs[i] for i in prompt_rows.repeat_interleave(n).tolist()]
        texts = self.tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask, strict=True)],
                                            skip_special_tokens=True)  # fmt: skip
        prompts = [row["prompt"] for row in rows]
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        token_lists = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        per_func = self.trl_rewards(rows, prompts, completions, token_lists)
        start = self.accelerator.process_index * len(rows)
        totals = reward_totals(per_func[start : start + len(rows)], self.reward_weights)
        shape = (-1, n)
        return Candidates(ids.view(*shape, ids.size(1)), mask.view(*shape, ids.size(1)), totals.view(shape),
                          alignment.view(shape), (top_logps.view(*shape, *top_logps.shape[1:]),
                                                  top_ids.view(*shape, *top_ids.shape[1:])))  # fmt: skip


# --------------------------------------------------------------------------------------------- the registry
class TermRows(NamedTuple):
    """What a term adds to a rollout: per-row tensors (first dimension = the rollout's rows; they travel to the loss
    as `RLSDEntries.term`, split and shuffled with the rows) and metrics to log (reduced over processes, so every
    process returns the same keys)."""

    values: dict[str, Tensor]
    metrics: dict[str, float]


class TermValue(NamedTuple):
    """A micro-batch's term before `teacher_rollout_coef` and gradient accumulation: its value (with gradient; 0.0
    when the micro-batch has nothing to learn from), the tokens or rows it is a mean over (its weight in the logged
    `rlsd/teacher_rollout_loss` across processes) and further metrics."""

    value: Tensor | float
    count: float
    metrics: dict[str, float]


class LossTerm(Protocol):
    """A loss term learned from teacher rollouts. Registered with `@loss_term`, it is built once per run as
    `cls(rollouts, **knobs)`: the shared `TeacherRollouts` and the values of its declared knobs (by field name).
    Subclass it to inherit the two checks, which refuse nothing."""

    def add(self, samples: TeacherSamples, pass_logps: Tensor | None) -> TermRows:
        """At each training rollout: what the loss needs, from the teacher's trajectories, as per-row tensors.
        `pass_logps`: the rule pass's teacher log-probs of every row's completion (B, T), when that pass ran on every
        row with the teacher prompts (None otherwise)."""
        ...

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], values: dict[str, Tensor], student_logps: Tensor
    ) -> TermValue:
        """At each loss: the micro-batch's term from its rows of `values` (what `add` returned), `model` the policy
        being trained (a forward with gradient), `student_logps` TRL's own log-probs of the completions (B, T)."""
        ...

    @classmethod
    def check_config(cls, args: Any) -> None:
        """Refuse, when the config is built, values the term cannot run with (a `ConfigError` naming the flag)."""

    @classmethod
    def check_supported(cls, args: Any, policy: torch.nn.Module, datasets: dict[str, Any]) -> None:
        """Refuse, when the trainer is built, a policy or dataset (`train_dataset`, `eval_dataset`) the term cannot
        run with."""


@dataclass(frozen=True)
class LossTermSpec:
    """A registered teacher-rollout term: its class, its knobs (`RLSDConfig` fields), its `teacher_rollout_coef`
    when left unset, and its one-line description."""

    name: str
    cls: type[LossTerm]
    knobs: tuple[str, ...]
    default_coef: float
    doc: str

    def build(self, rollouts: TeacherRollouts) -> LossTerm:
        """The term over `rollouts`, its knobs read from the run's config (their declared defaults when the config
        lacks them: a term registered after the config was built)."""
        args = rollouts.args
        return self.cls(rollouts, **{key: getattr(args, key, TERM_KNOBS[key].default) for key in self.knobs})


TERMS: dict[str, LossTermSpec] = {}
"""Every registered teacher-rollout term by name: what `RLSDConfig.teacher_rollout_loss` selects from (besides
"none")."""
TERM_KNOBS: dict[str, Knob] = {}
"""Every teacher-rollout term's knob by its `RLSDConfig` field name."""
_REQUIRED = ("add", "term", "check_config", "check_supported")
T = TypeVar("T", bound=type)


def loss_term(
    name: str, *, knobs: dict[str, Knob] | None = None, default_coef: float = 1.0, doc: str = ""
) -> Callable[[T], T]:
    """Register the `LossTerm` class `name`: `teacher_rollout_loss=name` selects it; each of its `knobs` is an
    `RLSDConfig` field of that name (declared once; a name may be shared only with the same declaration, and never
    with a credit rule's or a distillation loss's knob), handed to the class as a keyword argument; `default_coef` is
    `teacher_rollout_coef` when left unset. Adding a term is this one decorated class, here or in user code."""

    def register(cls: T) -> T:
        if name in TERMS or name == "none":
            raise ValueError(f"teacher-rollout term {name!r} is registered twice (or is 'none')")
        missing = [m for m in _REQUIRED if not callable(getattr(cls, m, None))]
        missing += [m for m in ("add", "term") if getattr(cls, m, None) is getattr(LossTerm, m)]
        if missing:
            raise TypeError(f"teacher-rollout term {name!r} does not define {', '.join(missing)} (see LossTerm)")
        declare_knobs(f"teacher-rollout term {name!r}", knobs, TERM_KNOBS, KNOBS, LOSS_KNOBS)
        summary = doc or " ".join((cls.__doc__ or "").split())
        TERMS[name] = LossTermSpec(name, cls, tuple(knobs or {}), default_coef, summary)
        return cls

    return register


def get_loss_term(name: str) -> LossTermSpec:
    """The registered term `name`; an unknown name is refused with the known ones listed."""
    if name not in TERMS:
        raise ValueError(f"unknown teacher-rollout term {name!r}; the known ones are {', '.join(TERMS)}")
    return TERMS[name]


# ---------------------------------------------------------------------------------------- what the trainer calls
def _per_row(name: str, values: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """`values` when each is a tensor with one entry per rollout row, as TRL's batch splitting needs (a term that
    returns anything else is named, rather than its tensors mis-split across micro-batches)."""
    for key, value in values.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.size(0) != rows:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"teacher-rollout term {name!r} returned {key!r} of shape {shape}: each value needs "
                             f"one entry per rollout row, a first dimension of {rows}")  # fmt: skip
    return values


@dataclass(frozen=True)
class TeacherRolloutTerm:
    """The run's teacher-rollout term as the trainer calls it, unconditionally: after TRL's rollout the teacher's
    samples and the term's per-row tensors (`add`, training rollouts only), at each loss `teacher_rollout_coef` * the
    micro-batch's term scaled for gradient accumulation (`term`), with its `rlsd/` metrics."""

    name: str  # `teacher_rollout_loss`
    rollouts: TeacherRollouts
    loss: LossTerm

    @classmethod
    def build(cls, **context: Any) -> TeacherRolloutTerm:
        """The term `args.teacher_rollout_loss` names over one `TeacherRollouts` made of `context` (its fields)."""
        rollouts = TeacherRollouts(**context)
        name = rollouts.args.teacher_rollout_loss
        return cls(name, rollouts, get_loss_term(name).build(rollouts))

    @staticmethod
    def check_supported(
        args: Any,
        policy: torch.nn.Module,
        datasets: dict[str, Any],
        *,
        images: bool,
        tools: bool,
        fsdp: bool,
        deepspeed: bool,
    ) -> None:
        """Teacher rollouts generate with transformers from the unwrapped teacher on each process's own prompts, from
        text prompts, in one turn: images, tools, FSDP and DeepSpeed are refused; then the term's own checks of
        `policy` and `datasets` (`train_dataset`, `eval_dataset`) run (`LossTerm.check_supported`)."""
        term = get_loss_term(args.teacher_rollout_loss)
        flags = {"images": images, "tools": tools, "FSDP": fsdp, "DeepSpeed": deepspeed}
        used = [name for name, on in flags.items() if on]
        if used:
            raise NotImplementedError(
                f"teacher_rollout_loss={args.teacher_rollout_loss!r} with {' and '.join(used)}: the teacher's "
                "generation is implemented for text prompts, one turn, on plain or DDP processes only"
            )
        term.cls.check_supported(args, policy, datasets)

    def add(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        entries: RLSDEntries,
        mode: str,
        pass_logps: torch.Tensor | None = None,
    ) -> None:
        """Training rollouts only: the teacher's samples (`TeacherRollouts.samples`) and the term's per-row tensors
        into `entries.term`; logs the term's metrics and `teacher_rollout_time_s`. `pass_logps`: the rule pass's
        teacher log-probs of every row's completion (PBSD reuses them as log pi_T(y- | x_T))."""
        if mode != "train":
            return
        start = time.perf_counter()
        samples = self.rollouts.samples(inputs, output, mode)
        added = self.loss.add(samples, pass_logps)
        entries.term = _per_row(self.name, added.values, len(inputs))
        self.rollouts.log(mode, {**added.metrics, "teacher_rollout_time_s": time.perf_counter() - start})

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], entries: RLSDEntries, student_logps: torch.Tensor
    ) -> torch.Tensor | float:
        """`teacher_rollout_coef` * the micro-batch's term (`LossTerm.term`), scaled for gradient accumulation, and
        `rlsd/teacher_rollout_loss` logged; 0 for a batch without the term's tensors (eval rollouts)."""
        if not entries.term:
            return 0.0
        mode = "train" if self.rollouts.training() else "eval"
        value, count, metrics = self.loss.term(model, inputs, entries.term, student_logps)
        number = value.item() if isinstance(value, Tensor) else float(value)
        self.rollouts.log(mode, {"teacher_rollout_loss": TokenMean(number, count), **metrics})
        accumulation = self.rollouts.accumulation() if mode == "train" else 1
        return self.rollouts.args.teacher_rollout_coef * value / accumulation


class NoTeacherRollouts:
    """The rollout term of a run without teacher rollouts (`teacher_rollout_loss="none"`): adds nothing to a
    rollout and 0 to the loss, so that the trainer calls it unconditionally."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        """No teacher trajectories to add (`TeacherRolloutTerm.add`'s arguments)."""

    def term(self, *args: Any, **kwargs: Any) -> float:
        """No term: 0 (`TeacherRolloutTerm.term`'s arguments)."""
        return 0.0


# ----------------------------------------------------------------------------------------------- BRTS, PBSD
def _positive(value: Any) -> str | None:
    """A number > 0 (a bool is not a number here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and value > 0.0 else f"must be > 0, got {value!r}"


@loss_term("brts", default_coef=0.05)
class BRTS(LossTerm):
    """Best-of-N rollout teacher selection (a reconstruction): the N are scored with the run's reward functions and
    one is kept per prompt: the best weighted total reward first (with 0/1 rewards: a correct one, reward > 0), then
    the most student-aligned (mean |TopK(p_S) & TopK(p_T)| / K over its tokens, K = `distill_overlap_k`, the student
    on the plain prompt); when none of the N has reward > 0 the teacher retries N more with the reference answer
    shown (the "answer" source's template) and the same choice is made among them; if still none is correct, the
    most aligned of all 2N is kept (logged, never dropped). With `privileged_source="answer"` the first N already see
    the answer, so there is no retry (it would re-sample the same prompt): the retry is what
    `privileged_source="none"` adds. The term is the token mean of KL(p_T^K || p_S^K) over the teacher's top K tokens
    (both renormalized over those K) at each token of the kept trajectory, the student teacher-forced on it after
    the plain prompt; the coefficient's default is the paper's lambda. Logs `rlsd/teacher_rollout_correct` (share of
    kept trajectories that are correct), `rlsd/teacher_rollout_retry` (share of prompts that needed the retry) and
    `rlsd/teacher_rollout_alignment`. Costs per step one teacher generation of N per prompt (2N when the retry runs,
    which then runs on every process), two no-grad forwards per candidate (teacher and student) and one more student
    forward with gradient per micro-batch on the kept trajectories. Needs `distill_overlap_k` >= 1 and a policy whose
    logits are a plain head's."""

    def __init__(self, rollouts: TeacherRollouts) -> None:
        self.rollouts = rollouts

    @classmethod
    def check_config(cls, args: Any) -> None:
        """K is `distill_overlap_k`: 0 would leave nothing to align or learn."""
        if args.distill_overlap_k < 1:
            raise ConfigError("--distill_overlap_k", "is 0 with teacher_rollout_loss='brts'",
                              "BRTS's K (alignment and top-K loss) is distill_overlap_k: pass e.g. 16")  # fmt: skip

    @classmethod
    def check_supported(cls, args: Any, policy: torch.nn.Module, datasets: dict[str, Any]) -> None:
        """The top-K KL projects hidden states through a plain head: a `policy` that caps or rescales its logits is
        refused (PBSD scores through TRL's fused head, which applies the model's scaling). The retry shows the
        reference answer: `datasets` need the answer column."""
        check_plain_lm_head(policy, "teacher_rollout_loss='brts'")
        for split_name in ("train_dataset", "eval_dataset"):
            AnswerSource(args).check_dataset(datasets.get(split_name), split_name)

    def add(self, samples: TeacherSamples, pass_logps: Tensor | None) -> TermRows:
        """Each prompt's kept trajectory and the teacher's top-K on it, on every row of its group (`ids`, `mask`,
        `topk_logps`, `topk_ids`); only the prompt's first local row keeps its mask, so that the loss-time student
        forward runs once per prompt, not on every row of the group."""
        rollouts, s = self.rollouts, samples
        device, count, real = s.teacher_ids.device, s.count, len(s.firsts)
        first = rollouts.candidates(s.inputs, s.prompt_rows, s.plain, s.teacher_ids, s.teacher_mask, s.ids, s.mask)
        correct = select_rollout(first.rewards, first.alignment)[1][:real]
        # the retry shows the reference answer; a source whose teacher prompts already show it would only re-sample
        # the same prompt, so it has none
        needs_retry = (~correct).sum() if "answer" not in rollouts.source.fills else torch.zeros((), device=device)
        target = int(rollouts.accelerator.gather(needs_retry.reshape(1)).max())
        retry = None
        if target > 0:  # on every process once any prompt anywhere needs it: gathering rewards is collective
            order = torch.cat([(~correct).nonzero().flatten(), torch.arange(count, device=device)])[:target]
            retry_rows = s.prompt_rows[order.cpu()]
            retry_ids, retry_mask = rollouts.answer_prompts(s.inputs, retry_rows)
            again = rollouts.generate(retry_ids, retry_mask, s.n)
            retry = rollouts.candidates(s.inputs, retry_rows, (s.plain[0][order], s.plain[1][order]), retry_ids,
                                        retry_mask, *again).spread(order, count)  # fmt: skip
        choice = select_brts(first.rewards, first.alignment, *((retry.rewards, retry.alignment) if retry else ()))
        pool = first.join(retry) if retry else first
        pick = torch.arange(count, device=device) * pool.rewards.size(1) + choice.index
        ids, mask, topk_logps, topk_ids = (value.flatten(0, 1)[pick][s.row_prompt.to(device)]
                                           for value in (pool.ids, pool.mask, *pool.topk))  # fmt: skip
        first_rows = torch.zeros(len(s.inputs), dtype=torch.bool, device=device)
        first_rows[s.firsts] = True
        values = {"ids": ids, "mask": mask * first_rows[:, None], "topk_logps": topk_logps, "topk_ids": topk_ids}
        metrics = {
            "teacher_rollout_correct": TokenMean(choice.correct[:real].float().mean().item(), real),
            "teacher_rollout_retry": TokenMean(choice.retried[:real].float().mean().item(), real),
            "teacher_rollout_alignment": TokenMean(pool.alignment.flatten()[pick][:real].mean().item(), real),
        }
        return TermRows(values, metrics)

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], values: dict[str, Tensor], student_logps: Tensor
    ) -> TermValue:
        """The token mean of KL(p_T^K || p_S^K) over the kept trajectories' tokens: one more forward of the student's
        backbone on [plain prompt ; trajectory], with gradient, on the rows that carry one (a prompt's first row),
        its hidden states projected `distill_chunk_tokens` at a time."""
        rollouts = self.rollouts
        rows = values["mask"].any(dim=1).nonzero().flatten()
        if rows.numel() == 0:  # no kept trajectory starts in this micro-batch
            return TermValue(0.0, 0.0, {})
        _, selected, states, logits_fn = rollouts.student_states(model, inputs, values, rows)
        top_logps, top_ids = values["topk_logps"][rows], values["topk_ids"][rows]
        per_token = chunked_topk_kl(states[selected], logits_fn, top_logps[selected], top_ids[selected],
                                    rollouts.args.distill_chunk_tokens)  # fmt: skip
        value = per_token.sum() / selected.sum().clamp(min=1)
        return TermValue(value, selected.sum().item(), {})


@loss_term(
    "pbsd",
    knobs={"pbsd_beta": Knob(0.1, "PBSD's beta, the inverse temperature of its DPO margin. Must be > 0.", _positive)},
)
class PBSD(LossTerm):
    """Preference-based self-distillation (a reconstruction): student completion j of a group is paired with teacher
    sample j mod N, and the term is the mean over completions of DPO's -log sigmoid(`pbsd_beta` * [(log pi(y+|x) -
    log pi_T(y+|x_T)) - (log pi(y-|x) - log pi_T(y-|x_T))]) with y+ the teacher sample, y- the student's completion,
    pi the student on the plain prompt x (sequence log-probs, with gradient) and pi_T the teacher on its teacher
    prompt x_T (no gradient). The coefficient's default leaves DPO's loss unscaled, as DPO uses it: its gradient on
    each sequence log-prob is already at most `pbsd_beta`. Logs `rlsd/pbsd_margin` (mean of the beta-scaled margin
    m). Costs per step one teacher generation of N per prompt, two no-grad teacher forwards (on its samples, and on
    the completions unless the rule's pass scored them all) and one more student forward with gradient per
    micro-batch on its distinct teacher samples."""

    def __init__(self, rollouts: TeacherRollouts, pbsd_beta: float) -> None:
        self.rollouts, self.beta = rollouts, pbsd_beta

    def add(self, samples: TeacherSamples, pass_logps: Tensor | None) -> TermRows:
        """Each row's paired teacher sample (`ids`, `mask`), the teacher's sequence log-prob of it (`ref_logps`) and
        of the row's completion (`neg_ref_logps`: `pass_logps` when the rule pass scored every row, else one more
        teacher pass)."""
        s, n = samples, samples.n
        device = s.teacher_ids.device
        per_sample = (s.teacher_ids.repeat_interleave(n, dim=0), s.teacher_mask.repeat_interleave(n, dim=0))
        teacher_logps = self.rollouts.trajectory_pass("teacher", *per_sample, s.ids, s.mask, None)[0]
        pick = s.row_prompt.to(device) * n + pair_index(s.positions.to(device) % s.group_size, n)
        values = {"ids": s.ids[pick], "mask": s.mask[pick], "ref_logps": (teacher_logps * s.mask).sum(-1)[pick]}
        if pass_logps is None:
            by_row = (s.teacher_ids[s.row_prompt], s.teacher_mask[s.row_prompt])
            pass_logps = self.rollouts.score("teacher", *by_row, s.output, {}).logps
        values["neg_ref_logps"] = (pass_logps * loss_mask(s.output)).sum(-1)
        return TermRows(values, {})

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], values: dict[str, Tensor], student_logps: Tensor
    ) -> TermValue:
        """The row mean of the DPO loss: log pi(y+ | x) from one forward (TRL's scoring forward, as log pi(y- | x)
        was) per distinct [prompt ; teacher sample] (the completions of a group share samples), log pi(y- | x) the
        sum of TRL's own log-probs (`student_logps`) of the completion."""
        ids, mask = values["ids"], values["mask"]
        rows, inverse = distinct_rows(torch.cat([inputs["prompt_ids"], inputs["prompt_mask"], ids, mask], dim=1))
        ids, mask = ids[rows], mask[rows]
        input_ids = torch.cat([inputs["prompt_ids"][rows], ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"][rows], mask], dim=1)
        logps, _, _ = self.rollouts.trl_logps(model, input_ids, attention_mask, ids.size(1))
        policy_neg = (student_logps * loss_mask(inputs)).sum(-1)
        losses, margins = pbsd_loss((logps * mask).sum(-1)[inverse], values["ref_logps"], policy_neg,
                                    values["neg_ref_logps"], self.beta)  # fmt: skip
        pairs = float(losses.numel())
        return TermValue(losses.mean(), pairs, {"pbsd_margin": TokenMean(margins.mean().item(), pairs)})
