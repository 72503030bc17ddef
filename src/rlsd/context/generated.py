"""Privileged contexts generated during training: `GeneratedSource`, the base of a source whose context a generator
writes after the rewards (a harness's plan, a reflection on a failed attempt, an annotator's marks, a parallel version
of the prompt), and the generators it can call.

The generator is pluggable with `context_generator`: "policy" or "teacher" (the model's current weights, through
`RolloutView.generate`, under the run's generation settings), or a function, registered with `@context_generator` or
named as "module:function", called once per row with a `GenerationRequest` (deterministic harnesses, scripted
judges, the embedded task's checker). Every call is counted and timed (`rlsd/context_generator_calls`,
`rlsd/context_generator_time_s`); a generator that raises, or returns an empty or over-long context, stops the run
naming the source and the row, unless the source falls back to the plain prompt, which is counted
(`rlsd/context_fallback_count`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rlsd.context.citation import ContextRecord
from rlsd.context.sources import Context, PrivilegedSource, RolloutView
from rlsd.context.templates import template_fields
from rlsd.core.credit import TokenMean
from rlsd.core.rules import Knob
from rlsd.data.rewards import import_user_module

MODEL_GENERATORS = ("policy", "teacher")


@dataclass(frozen=True)
class GenerationRequest:
    """What a generator is asked for one row: `prompt`, the request a model would complete (a string or chat
    messages), the dataset `row`, the row's `completion` text and weighted total `reward` (None when the source does
    not read them), the source's `name`, and the `stage` of a source that asks in several steps (a harness's "plan",
    or its "draft" then "verify"; "" for a one-step source)."""

    prompt: Any
    row: dict[str, Any]
    completion: str | None = None
    reward: float | None = None
    source: str = ""
    stage: str = ""


GeneratorFn = Callable[[GenerationRequest], str]
GENERATORS: dict[str, GeneratorFn] = {}
"""Every function generator registered by name (`@context_generator`): what `context_generator` may name besides the
models and "module:function"."""


def context_generator(name: str) -> Callable[[GeneratorFn], GeneratorFn]:
    """Register the function `fn(request) -> str` as the generator `name`."""

    def register(fn: GeneratorFn) -> GeneratorFn:
        if name in GENERATORS or name in MODEL_GENERATORS:
            raise ValueError(f"context generator {name!r} is registered twice (or names a model)")
        GENERATORS[name] = fn
        return fn

    return register


def resolve_generator(spec: str) -> GeneratorFn | None:
    """The function `spec` names (a registered generator or "module:function"), None for a model generator; an
    unknown name is refused with the known ones."""
    if spec in MODEL_GENERATORS:
        return None
    if spec in GENERATORS:
        return GENERATORS[spec]
    if ":" in spec:
        module_path, attribute = spec.split(":", 1)
        try:
            module = import_user_module(module_path)
        except ImportError as err:
            raise ValueError(f"context_generator={spec!r}: cannot import module {module_path!r} ({err})") from err
        if not callable(getattr(module, attribute, None)):
            raise ValueError(f"context_generator={spec!r}: module {module_path!r} has no function {attribute!r}")
        return getattr(module, attribute)
    known = ", ".join([*MODEL_GENERATORS, *GENERATORS])
    raise ValueError(f"context_generator={spec!r} is not one of {known}, nor a 'module:function'")


def chat_turn(prompt: Any, text: str) -> Any:
    """A generator's request `text` as one user turn when the dataset's `prompt` is a conversation, else as is."""
    return [{"role": "user", "content": text}] if isinstance(prompt, list) else text


def no_context_frac(has_context: Sequence[bool]) -> TokenMean:
    """`no_context_frac`: the share of a source's rows left without context, weighted by their number."""
    return TokenMean(sum(not has for has in has_context) / max(len(has_context), 1), len(has_context))


def instruction_check(fields: Sequence[str], required: str = "completion") -> Callable[[Any], str | None]:
    """A knob check for a generator's instruction: a format string with `{required}` naming no field besides
    `fields`."""
    need = "{" + required + "}"

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string with {need}, got {value!r}"
        try:
            named = template_fields(value)
        except ValueError:
            return f"must be a valid format string with {need}, got {value!r}"
        if required not in named:
            return f"must contain {need}, got {value!r}"
        unknown = sorted(named - set(fields))
        braced = ["{" + name + "}" for name in fields]
        known = " and ".join([", ".join(braced[:-1]), braced[-1]]) if len(braced) > 1 else braced[0]
        return f"may name only {known}, got {{{unknown[0]}}}" if unknown else None

    return check


def finite_number(value: Any) -> str | None:
    """A knob check: a finite number (a bool is not one here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and math.isfinite(value) else f"must be a finite number, got {value!r}"


def _generator_spec(value: Any) -> str | None:
    """A knob check: a non-empty string."""
    return None if isinstance(value, str) and value else f"must name a generator, got {value!r}"


def _positive_int(value: Any) -> str | None:
    """A knob check: an integer >= 1."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"must be an integer >= 1, got {value!r}"


GENERATED_KNOBS = {
    "context_generator": Knob(
        "policy",
        'What writes a generated context: "policy" or "teacher" (its current weights, the run\'s generation '
        'settings), a function registered with @context_generator, or "module:function".',
        _generator_spec,
    ),
    "context_max_chars": Knob(4000, "Longest generated context, in characters: a longer one is refused.",
                              _positive_int),
    "context_max_tokens": Knob(
        2048, "Longest teacher prompt with a generated context, in tokens: a longer one is refused, never truncated.",
        _positive_int,
    ),
}  # fmt: skip


class GeneratedSource(PrivilegedSource):
    """The base of a source whose context is generated after the rewards: subclasses build each row's
    `GenerationRequest` and turn the generated texts into template fields; `generate` runs the generator with the
    checks. `falls_back` (class attribute): an empty context leaves the row without context (counted) instead of
    stopping the run. `generated_fields` (class attribute): the template fields a generator wrote, each with the text
    a row without one shows; `record` keeps the recent ones of training rollouts (`remember`), which the held-out
    citation metric reads (`rlsd.context.citation`)."""

    needs_completions = True
    needs_generator = True
    knobs = GENERATED_KNOBS
    falls_back: ClassVar[bool] = False
    generated_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.record = ContextRecord()

    def remember(self, view: RolloutView, rows: Sequence[int], context: Context) -> None:
        """Record the generated fields of a training rollout's rows that have context (a placeholder is no context),
        each with the row's completion when the source read it (a reflection quotes the attempt: those words are the
        student's own)."""
        if view.mode != "train":
            return
        texts = view.completion_texts
        quoted = [texts[view.offset + i] if texts is not None else "" for i in rows]
        self.record.add(
            (text, own)
            for name, placeholder in self.generated_fields.items()
            for text, has, own in zip(context.fields[name], context.has_context, quoted, strict=True)
            if has and text != placeholder
        )

    def max_prompt_tokens(self) -> int | None:
        return self.args.context_max_tokens

    def requests(
        self, view: RolloutView, rows: Sequence[int], prompt: Callable[[int], Any]
    ) -> list[GenerationRequest]:
        """One request per local row in `rows`, its prompt `prompt(i)`, with the row's completion and reward."""
        texts, rewards = view.completion_texts, view.rewards
        return [
            GenerationRequest(
                prompt(i),
                dict(view.rows[i]),
                texts[view.offset + i] if texts is not None else None,
                rewards[view.offset + i] if rewards is not None else None,
                self.name,
            )
            for i in rows
        ]

    def generate(
        self, view: RolloutView, rows: Sequence[int], requests: Sequence[GenerationRequest]
    ) -> tuple[list[str | None], dict[str, float]]:
        """The generated text of each request (`rows`: their local row indices, for errors), None where a
        `falls_back` source got an empty one, and the call metrics. Every process must call it for the same number
        of batches when the generator is a model (it may generate collectively)."""
        spec = self.args.context_generator
        function = resolve_generator(spec)
        start = time.perf_counter()
        if function is None:
            if view.generate is None:
                raise RuntimeError(f"privileged source {self.name!r}: no text generator was handed to the source")
            try:
                texts = view.generate([request.prompt for request in requests], spec)
            except Exception as err:
                raise RuntimeError(
                    f"privileged source {self.name!r}: the {spec} failed to generate the contexts of rows "
                    f"{list(rows)} ({type(err).__name__}: {err})"
                ) from err
            calls = 1 if requests else 0
        else:
            texts = [self._call(function, spec, row, request) for row, request in zip(rows, requests, strict=True)]
            calls = len(requests)
        elapsed = time.perf_counter() - start
        checked = [self._checked(text, spec, row) for row, text in zip(rows, texts, strict=True)]
        metrics = {
            "context_generator_calls": float(calls),
            "context_generator_time_s": elapsed,
            "context_fallback_count": float(sum(text is None for text in checked)),
            **self.answer_share(requests, checked),
        }
        return checked, metrics

    def answer_share(self, requests: Sequence[GenerationRequest], texts: Sequence[str | None]) -> dict[str, Any]:
        """`context_answer_frac`: the share of generated contexts that contain their row's reference answer (the
        `privileged_column`, when the row has one): a context that spells out the answer is privileged information
        too, whatever the source meant it to be."""
        column = getattr(self.args, "privileged_column", None)
        pairs = [
            (str(request.row[column]).strip(), text)
            for request, text in zip(requests, texts, strict=True)
            if text is not None and column in request.row and str(request.row[column]).strip()
        ]
        if not pairs:
            return {}
        share = sum(answer in text for answer, text in pairs) / len(pairs)
        return {"context_answer_frac": TokenMean(share, len(pairs))}

    def _call(self, function: GeneratorFn, spec: str, row: int, request: GenerationRequest) -> Any:
        """One function generator call; an exception stops the run naming the source, the generator and the row."""
        try:
            return function(request)
        except Exception as err:
            raise RuntimeError(
                f"privileged source {self.name!r}: context_generator={spec!r} raised on rollout row {row} "
                f"({type(err).__name__}: {err})"
            ) from err

    def _checked(self, text: Any, spec: str, row: int) -> str | None:
        """`text` when it is a non-empty string within `context_max_chars`; an empty one is None for a `falls_back`
        source; anything else stops the run naming the row."""
        where = f"privileged source {self.name!r}: context_generator={spec!r} returned"
        if not isinstance(text, str):
            raise TypeError(f"{where} a {type(text).__name__} for rollout row {row}, not a string")
        if not text.strip():
            if self.falls_back:
                return None
            raise ValueError(f"{where} an empty context for rollout row {row}")
        if len(text) > self.args.context_max_chars:
            raise ValueError(
                f"{where} {len(text):,} characters for rollout row {row}, over context_max_chars="
                f"{self.args.context_max_chars:,}; raise it or shorten what the generator writes"
            )
        return text
