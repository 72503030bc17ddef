"""The bounded evaluator of GSM-Symbolic template expressions: a restricted AST walker (templates are data, never
passed to Python's eval), the functions a template may call, and the bounds they keep. An expression of more than
MAX_NODES nodes or nested deeper than MAX_DEPTH is refused before it is evaluated (which bounds its time), a value
beyond MAX_INT_BITS bits or MAX_ITEMS items before it is built: both as an ExpressionLimitError.
`rlsd.data.gsm_symbolic` draws and renders template variants with it.
"""

from __future__ import annotations

import ast
import itertools
import operator
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

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

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}  # fmt: skip


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
