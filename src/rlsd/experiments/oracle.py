"""The positive control of issue 26: oracle token credit from the embedded task's checker, a credit rule used only in
the benchmarks (`credit="oracle"`, registered by `register()`, which the benchmarks call when a method selects it; the
library never imports this module).

The checker marks where a wrong completion first departs from the task's own steps and everything after it (the
"task-annotator" context generator, read through `privileged_source="annotation"`, whose error spans reach the rule as
`Signals.token_labels` = -1). With lam_k (RLSD's schedule; the benchmark holds lam = 1):

    A_i < 0 (a wrong completion):   A_it = A_i * ((1 - lam) + lam * e_t),  e_t = 1 on its error span, 0 before it
    A_i >= 0:                       A_it = A_i

so that the correct prefix of a wrong completion is left untouched (no blame) and its first wrong step and all that
follows keep the full blame; correct completions keep GRPO's credit. A wrong row with no error-span token (an
annotation that was not located) keeps A_i on every token, counted in `rlsd/oracle_unlabelled_count`. The teacher pass
still runs (the rule is dispatched as a teacher rule) and its log-probs are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlsd.context.annotation import ERROR
from rlsd.core.credit import _advantage_metrics, _masked_mean
from rlsd.core.rules import RULES, TEACHER, RuleParams, Signals, credit_rule

ORACLE = "oracle"
"""The rule's name (`RLSDConfig.credit`); the benchmark method of the same name (`rlsd.experiments.methods`) sets it
with the checker's annotations and lam = 1 held."""
MISSING_LABELS = (
    "credit='oracle' reads the checker's token labels: use privileged_source='annotation' with "
    "context_generator='task-annotator' (the embedded task's checker)"
)


def oracle_advantages(seq_advantages: Tensor, token_labels: Tensor, mask: Tensor, lam: float) -> tuple[Tensor, dict]:
    """(B, T) oracle token advantages (see the module docstring) and their metrics, in float64."""
    active = mask.bool()
    adv = seq_advantages.double().unsqueeze(1)
    error = (token_labels == ERROR) & active
    wrong = (adv < 0).squeeze(1)
    unlabelled = wrong & ~error.any(dim=1)
    blame = error | unlabelled.unsqueeze(1)
    multiplier = torch.ones(mask.shape, dtype=torch.float64, device=mask.device)
    multiplier = multiplier.masked_fill(wrong.unsqueeze(1) & ~blame, 1.0 - lam)
    token_adv = (adv * multiplier).masked_fill(~active, 0.0)
    wrong_tokens = wrong.unsqueeze(1) & active
    metrics = {
        **_advantage_metrics(token_adv, mask),
        "oracle_blamed_frac": _masked_mean(blame.double(), wrong_tokens),
        "oracle_unlabelled_count": float(unlabelled.sum().item()),
    }
    return token_adv, metrics


def oracle(signals: Signals, params: RuleParams) -> tuple[Tensor, dict[str, float]]:
    """Oracle credit: a wrong completion's correct prefix is not blamed (`oracle_advantages`)."""
    if signals.token_labels is None:
        raise ValueError(MISSING_LABELS)
    return oracle_advantages(signals.seq_advantages, signals.token_labels, signals.mask, params.lam)


def register() -> None:
    """Register the rule as `credit="oracle"` unless it is registered: called by the benchmarks when a method selects
    it, never on import (the generic tests of every registered rule never see a rule that needs the checker)."""
    if ORACLE not in RULES:
        credit_rule(ORACLE, source="issue 26 positive control: the task's checker", exact=True,
                    needs=TEACHER | {"token_labels"}, grpo_when_lambda_zero=True)(oracle)  # fmt: skip
