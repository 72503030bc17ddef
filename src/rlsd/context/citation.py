"""Citation of generated contexts: whether a student's held-out completions repeat what a generated teacher context
(a harness's plan, a reflection, an annotator's diagnosis, a parallel prompt) showed the teacher in training.

A generated context that carries the answer or the task's working is privileged information like the reference
answer: a student distilled towards a teacher that read it may learn to write it without having seen it, as OPSD's
student learns to write `ref=`. The metric here is that leakage for contexts nobody wrote down in advance, so it
cannot grep for a fixed marker. Its definition:

    a completion *cites* the recorded contexts when it shares with one of them a window of exactly `CITE_CHARS`
    consecutive characters that neither the completion the context was written about nor any background text
    contains, every text compared after `mask_digits`.

- **Masked digits** (each run of digits becomes one `0`): held-out problems have other numbers than the training
  problems whose contexts were recorded, so a citation is the context's wording and form (`Plan: 0*0;0+#0`,
  `Lesson: work out`, `three plus`), not its numbers; a context's numbers that equal the answer are measured apart
  (`rlsd/context_answer_frac`, and the reference-answer leakage).
- **The background** is what the student may write without ever citing a context: the held-out prompts (a
  completion may copy its own prompt), and the student's usual output (its completions before training, and the
  reference solutions of the held-out problems). A window of the context that the student writes anyway is no
  evidence that it read the context; a window of its usual output is never one of the windows looked for.
- **The quoted completion**: a context written about a training completion (a reflection on a failed attempt quotes
  its wrong step) is recorded with that completion, whose windows are the student's own output, not the context's.
- **`CITE_CHARS` = 8**: longer than any one masked step of the embedded task with its separator (`0*0=0;`, 6), so a
  single step never counts alone, and short enough to catch a context's frame words (`Plan: 0*`, `Lesson: `,
  `key step`, `three pl`).

It is conservative for a context the policy writes in the student's own form (`ophsd`, `resd`): a window such a
context shares with the student's later output counts when it is outside the background.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence

CITE_CHARS = 8
"""The window, in characters after `mask_digits`, that a completion must share with a recorded context."""
RECORD_SIZE = 512
"""The most generated contexts a source records: the most recent distinct ones (`ContextRecord`)."""
_DIGITS = re.compile(r"\d+")


def mask_digits(text: str) -> str:
    """`text` with every maximal run of digits replaced by one `0`: `4*5=20;3+#1` -> `0*0=0;0+#0`."""
    return _DIGITS.sub("0", text)


def windows(text: str, size: int = CITE_CHARS) -> set[str]:
    """Every run of `size` consecutive characters of `text` after `mask_digits` (none when it is shorter)."""
    if size < 1:
        raise ValueError(f"a citation window must be >= 1 character, got {size}")
    masked = mask_digits(text)
    return {masked[i : i + size] for i in range(len(masked) - size + 1)}


def distinctive_windows(
    contexts: Iterable[tuple[str, str]], background: Iterable[str], size: int = CITE_CHARS
) -> frozenset[str]:
    """The windows of the contexts, each a pair (context, the completion it was written about: "" for none), that
    neither its own completion nor any background text contains: what a completion must write to cite one."""
    found: set[str] = set()
    for text, quoted in contexts:
        found |= windows(text, size) - windows(quoted, size)
    for text in background:
        found -= windows(text, size)
    return frozenset(found)


def cited_window(completion: str, distinctive: frozenset[str], size: int = CITE_CHARS) -> str | None:
    """The first of the `distinctive` windows (of `distinctive_windows` with the same `size`) that `completion` writes,
    in its masked text; None when it writes none."""
    masked = mask_digits(completion)
    return next((masked[i : i + size] for i in range(len(masked) - size + 1) if masked[i : i + size] in distinctive),
                None)  # fmt: skip


def cites(completion: str, distinctive: frozenset[str], size: int = CITE_CHARS) -> bool:
    """Whether `completion` writes one of the `distinctive` windows."""
    return cited_window(completion, distinctive, size) is not None


def cited_windows(
    completions: Sequence[str], contexts: Iterable[tuple[str, str]], background: Iterable[str], size: int = CITE_CHARS
) -> list[str | None]:
    """Each completion's first window citing the `contexts` against the `background` (`cited_window`), None for one
    that cites none; at least one completion is needed."""
    if not completions:
        raise ValueError("a citation rate needs at least one completion")
    distinctive = distinctive_windows(contexts, background, size)
    return [cited_window(completion, distinctive, size) for completion in completions]


def citation_rate(
    completions: Sequence[str], contexts: Iterable[tuple[str, str]], background: Iterable[str], size: int = CITE_CHARS
) -> float:
    """The share of `completions` that cite the `contexts` against the `background` (0 when no context was
    recorded)."""
    found = cited_windows(completions, contexts, background, size)
    return sum(window is not None for window in found) / len(found)


class ContextRecord:
    """The most recent `size` distinct contexts a generated source showed its teacher in training, oldest first, each
    a pair (context, the completion it was written about: "" for none): a pair recorded again moves to the newest
    place, and the oldest is dropped beyond `size`. Kept in memory for the run's own evaluations (not in checkpoints:
    a resumed run records afresh), per process."""

    def __init__(self, size: int = RECORD_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a context record holds >= 1 text, got {size}")
        self.size = size
        self._texts: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.seen = 0

    def add(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record the (context, quoted completion) `pairs` in order (every one counted in `seen`, the distinct ones
        kept)."""
        for pair in pairs:
            self.seen += 1
            self._texts.pop(pair, None)
            self._texts[pair] = None
            if len(self._texts) > self.size:
                self._texts.popitem(last=False)

    def texts(self) -> list[tuple[str, str]]:
        """The recorded pairs, oldest first."""
        return list(self._texts)

    def __len__(self) -> int:
        return len(self._texts)
