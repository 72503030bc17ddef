"""`contrast`: RLCSD's privileged contexts (arXiv 2606.11709), a correct sibling as the teacher's hint and, for the
contrast, up to K wrong ones.

For each completion the positive hint is a correct completion of its group other than itself, and the negative hints
are up to `contrast_negatives` (K) incorrect completions of its group other than itself (all of them when there are
fewer), each drawn at random as the paper's code draws them. Both are shown through the same template (`{hint}`), so
that what any hint does to the teacher's style cancels in RLCSD's e_ctr (`rlsd.core.contrast_rule`). A completion is
correct when its total reward reaches `sibling_reward_threshold` (a NaN reward is neither). A completion without a
correct or without an incorrect sibling has no context: its credit stays A_i (the paper drops it from the update).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, ClassVar

from rlsd.context.sources import Context, PrivilegedSource, RolloutView, privileged_source
from rlsd.core.credit import TokenMean
from rlsd.core.rules import Knob

CONTRAST_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n"
    "{hint}\n"
    "=== Reference Solution End ===\n\n"
    "After reading the reference solution above, make sure you understand the reasoning behind each step.\n"
)
"""The paper's "Reference Solution" wrapper (its neutral wording), the same for the correct and the wrong hints."""
NO_HINT_TEXT = "(no reference solution)"
"""The hint of a row without context, and of a negative slot a row cannot fill (its pass is not counted)."""


def _positive_int(value: Any) -> str | None:
    """A knob check: an integer >= 1."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"must be an integer >= 1, got {value!r}"


@privileged_source
class ContrastSource(PrivilegedSource):
    """RLCSD's hints (see the module docstring): `context` gives each row its correct sibling, `negative_contexts`
    its K wrong ones, one `Context` per slot."""

    name = "contrast"
    fills = ("hint",)
    default_template = CONTRAST_TEACHER_TEMPLATE
    needs_completions = True
    knobs: ClassVar[dict[str, Knob]] = {
        "contrast_negatives": Knob(
            4,
            "privileged_source='contrast' (RLCSD): K, the most wrong siblings each row is contrasted with (the "
            "paper's rlcsd_k_max); a row with fewer uses those there are. One more teacher pass each.",
            _positive_int,
        )
    }

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self._rng: random.Random | None = None

    def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
        pools = self.pools(view, rows)
        rng = self.rng(view)
        picks = [rng.choice(right) if right and wrong else None for right, wrong in pools]
        has_context = [pick is not None for pick in picks]
        texts = [NO_HINT_TEXT if pick is None else view.completion_texts[pick] for pick in picks]
        with_context = [len(wrong) for (_, wrong), has in zip(pools, has_context, strict=True) if has]
        count = max(len(rows), 1)
        metrics = {
            "no_context_frac": TokenMean(sum(not has for has in has_context) / count, len(rows)),
            "contrast_no_positive_count": float(sum(not right for right, _ in pools)),
            "contrast_no_negative_count": float(sum(not wrong for _, wrong in pools)),
            "contrast_negatives_mean": TokenMean(
                sum(min(k, self.args.contrast_negatives) for k in with_context) / max(len(with_context), 1),
                len(with_context),
            ),
        }
        return Context({"hint": texts}, has_context, metrics)

    def negative_contexts(self, view: RolloutView, rows: Sequence[int], k: int | None = None) -> list[Context]:
        """The K negative contexts of the local rows `rows`: slot j holds each row's j-th wrong sibling (drawn without
        replacement), and `has_context` marks the rows that have one; a row with fewer shows its first wrong sibling
        in the slots it cannot fill (a pass of the same shape on every process, not counted)."""
        k = self.args.contrast_negatives if k is None else k
        rng = self.rng(view)
        chosen = [rng.sample(wrong, min(k, len(wrong))) for _, wrong in self.pools(view, rows)]
        texts = view.completion_texts
        return [
            Context(
                {"hint": [texts[c[slot] if slot < len(c) else c[0]] if c else NO_HINT_TEXT for c in chosen]},
                [slot < len(c) for c in chosen],
            )
            for slot in range(k)
        ]

    def pools(self, view: RolloutView, rows: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Each local row's correct and incorrect siblings (indices into the gathered completions), itself
        excluded."""
        rewards, size = view.rewards, view.group_size
        if size < 1 or len(rewards) % size:
            raise ValueError(f"{len(rewards)} rewards do not split into groups of {size}")
        threshold = self.args.sibling_reward_threshold
        pools = []
        for i in rows:
            index = view.offset + i
            first = index - index % size
            others = [j for j in range(first, first + size) if j != index and not math.isnan(rewards[j])]
            right = [j for j in others if rewards[j] >= threshold]
            pools.append((right, [j for j in others if j not in right]))
        return pools

    def rng(self, view: RolloutView) -> random.Random:
        """The draws' generator: seeded once from the run's seed and this process's first row, so that a run repeats
        its draws and processes draw independently."""
        if self._rng is None:
            self._rng = random.Random(f"contrast:{getattr(self.args, 'seed', 0)}:{view.offset}")
        return self._rng
