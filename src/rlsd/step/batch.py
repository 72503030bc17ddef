"""The `rlsd_*` entries RLSD adds to TRL's rollout batch, owned by one typed dataclass.

TRL 1.16 buffers the dict that `_generate_and_score_completions` returns, shuffles and splits it by rows into
micro-batches (`split_tensor_dict`, `shuffle_sequence_dict`), and hands each to `_compute_loss`. Whatever RLSD needs at
loss time must therefore travel in that dict as tensors whose first dimension is the row (or 0-dim scalars, which
TRL copies to every micro-batch). `RLSDEntries.to_batch` writes them under the `rlsd_` prefix and
`RLSDEntries.from_batch` reads them back; nothing else (the trainer, its collaborators) names an `rlsd_*` key
(`tests/test_layout.py` checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

PREFIX = "rlsd_"
TEACHER_TYPES_PREFIX = "teacher_types_"
DICT_PREFIXES = {
    "teacher_types": PREFIX + TEACHER_TYPES_PREFIX,
    "state_values": PREFIX + "state_",
    "term": PREFIX + "term_",
}
"""The dict fields of `RLSDEntries`: each entry travels flattened, as `<prefix><key>` (`rlsd_term_ids`)."""


@dataclass
class RLSDEntries:
    """Per-row tensors (B, ...) and per-batch scalars RLSD carries from rollout to loss.

    Teacher inputs (only when a distillation loss re-runs the teacher at loss time): the left-padded teacher prompt ids
    and mask, and its token-type ids for vision models (`teacher_types[key]`). Context: which rows have any privileged
    context. Distillation: each row's weight in the distillation term; each completion token's label, for a loss that
    routes tokens by label (TRACE: +1 key span, -1 error span, 0 elsewhere), and the tokens it leaves to the policy
    gradient (the credit's token advantages are 0 on the others); SDPG's reference log-probs. Deferred
    credit (only when the student's log-probs come from the loss's own forward): the sequence advantages, the teacher's
    log-probs (and entropy; RLCSD: their log-mean-exp over a contrastive source's negative contexts), which rows the
    rule scores, lam and the rule state's values. Teacher rollouts (`teacher_rollout_loss`): the per-row tensors the
    run's loss term returned at rollout time (`rlsd.step.rollout_term.LossTerm.add`; BRTS: each row's kept teacher
    trajectory and the teacher's top-K on it; PBSD: its paired teacher sample and the teacher's sequence log-probs), by
    the term's own keys, so that a new term needs no field here."""

    has_context: Tensor | None = None  # (B,) bool
    teacher_prompt_ids: Tensor | None = None  # (B, P)
    teacher_prompt_mask: Tensor | None = None  # (B, P)
    teacher_types: dict[str, Tensor] = field(default_factory=dict)  # (B, P) token types by processor key (and a
    # teacher transform's own images, row-first: `rlsd.context.vision.rows_first`)
    distill_weight: Tensor | None = None  # (B,)
    distill_labels: Tensor | None = None  # (B, T) long: the token labels a routed loss reads
    policy_mask: Tensor | None = None  # (B, T) float: the tokens the policy gradient runs on (a routed loss's others)
    ref_logps: Tensor | None = None  # (B, T)
    seq_advantages: Tensor | None = None  # (B,)
    teacher_logps: Tensor | None = None  # (B, T)
    teacher_entropy: Tensor | None = None  # (B, T)
    teacher_contrast_logps: Tensor | None = None  # (B, T) log-mean-exp over the negative contexts (RLCSD)
    token_labels: Tensor | None = None  # (B, T) long: the source's token labels, for a rule that reads them
    scored: Tensor | None = None  # (B,) bool: the rows a multiplicative rule scores (A_i != 0)
    lam: Tensor | None = None  # 0-dim float64
    state_values: dict[str, Tensor] = field(default_factory=dict)  # 0-dim float64 by parameter name
    term: dict[str, Tensor] = field(default_factory=dict)  # (B, ...) the teacher-rollout term's tensors by its key

    @property
    def deferred(self) -> bool:
        """True when the credit waits for the loss: for the student's log-probs of its forward (and, with a
        distillation loss, for the teacher's of its teacher pass)."""
        return self.seq_advantages is not None

    def to_batch(self) -> dict[str, Tensor]:
        """The `rlsd_*` entries to put into TRL's rollout dict (None fields are left out)."""
        entries: dict[str, Tensor] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in DICT_PREFIXES:
                entries.update({DICT_PREFIXES[item.name] + key: v for key, v in value.items()})
            elif value is not None:
                entries[PREFIX + item.name] = value
        return entries

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> RLSDEntries:
        """Read the entries back from a (micro-)batch."""
        values: dict[str, Any] = {item.name: batch.get(PREFIX + item.name) for item in fields(cls)}
        for name, prefix in DICT_PREFIXES.items():
            values[name] = {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}
        return cls(**values)


def scalar(value: float) -> Tensor:
    """A per-batch scalar as TRL copies it to every micro-batch."""
    return torch.tensor(value, dtype=torch.float64)


def token_pieces(decode_tokens: Callable[[Any], list[str]], ids: Tensor) -> list[list[str]]:
    """Each row's tokens of (B, T) `ids` decoded one by one (the tokenizer's `batch_decode` over a column), for a
    rule or loss that reads each token's text."""
    return [decode_tokens(row.unsqueeze(1)) for row in ids.cpu()]


def loss_mask(batch: dict[str, Any]) -> Tensor:
    """Completion tokens that enter the loss: the completion mask times TRL's tool mask when present."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


@dataclass
class LossState:
    """What the trainer's `_compute_loss` hands to the next scoring forward TRL's loss runs: the deferred credit and
    the micro-batch whose advantages it replaces; the forward stores its log-probs back."""

    pending: RLSDEntries | None
    batch: dict[str, Any]
    logps: Tensor | None = None

    def check_scored(self) -> None:
        """Refuse a loss whose forward never handed its log-probs back (the credit waiting for them not computed)."""
        if self.logps is None:
            raise RuntimeError(
                "TRL's loss never called _get_per_token_logps_and_entropies, so the token credit that waits for its "
                "log-probs was not computed and the step would silently train with sequence advantages; this "
                "trainer relies on TRL 1.16's loss (check the TRL version and loss options such as liger)"
            )
