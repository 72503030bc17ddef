"""The held-out side of the generated-context citation metric (`rlsd.context.citation`) in the demo and the
benchmarks: at each evaluation, the share of the student's greedy held-out completions that cite a context its run's
generated source showed the teacher in training (`GeneratedSource.record`), reported as `context_citation_rate` next
to `leakage_rate` (the reference-answer leakage)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlsd.config import RLSDConfig
from rlsd.context.citation import cited_windows
from rlsd.context.generated import GeneratedSource
from rlsd.context.sources import get_source
from rlsd.experiments.task import Problem


@dataclass
class HeldoutCitations:
    """One run's meter over the held-out `problems`: its `source` (the trainer's, set once the trainer exists; None
    before training: nothing recorded yet) and its background, fixed at the first evaluation (before training): the
    held-out prompts, their reference solutions and the student's completions then."""

    problems: Sequence[Problem]
    source: Any = None
    background: list[str] | None = None

    def measure(self, completions: Sequence[str]) -> dict[str, Any]:
        """`context_citation_rate` of the held-out `completions` (one per problem), `context_record_size` (the
        number of recorded contexts they were compared with) and, when one cites, `context_citation_example`: the
        first citing completion and the masked window it shares with a context. The first call fixes the
        background."""
        if self.background is None:
            self.background = [
                *(problem.prompt for problem in self.problems),
                *(problem.solution() for problem in self.problems),
                *completions,
            ]
        contexts = self.source.record.texts() if self.source is not None else []
        found = cited_windows(completions, contexts, self.background)
        cited = [(text, window) for text, window in zip(completions, found, strict=True) if window is not None]
        example = {"context_citation_example": {"completion": cited[0][0], "window": cited[0][1]}} if cited else {}
        return {
            "context_citation_rate": len(cited) / len(completions),
            "context_record_size": float(len(contexts)),
            **example,
        }


def heldout_citations(overrides: dict[str, Any], problems: Sequence[Problem]) -> HeldoutCitations | None:
    """A meter for a run whose privileged source (`overrides`' or the config's default) is a generated one, else
    None."""
    name = overrides.get("privileged_source", RLSDConfig.privileged_source)
    return HeldoutCitations(problems) if issubclass(get_source(name), GeneratedSource) else None
