"""A `--config recipe.yaml`'s values checked against the types of the flags they set, before TRL reads them (issue 27).

TRL's parser makes each recipe value the default of its flag, and argparse converts a default only when it is a
string: `num_generations: 2.5` reached the config as a float, `reward_funcs: math_accuracy` as a string read letter
by letter, `eval_strategy: no` (YAML's false) as a bool. Here each key's value is checked as the flag would check
it on the command line (its type, its choices, a list for a flag that takes several values), and a mismatch is
refused naming the key, the value and the type expected (a `ConfigError`: one line, exit status 2). Unknown keys are
left to TRL's parser, which names them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rlsd.infra.validate import ConfigError

FIX = "correct it in the recipe (a flag on the command line overrides the recipe)"
TRUTHY = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")
"""The strings transformers' `string_to_bool` reads as a boolean."""


def recipe_path(argv: list[str] | None) -> str | None:
    """The file after `--config` on the command line (`sys.argv` when `argv` is None), None without one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" in args[:-1]:
        return args[args.index("--config") + 1]
    return None


def load_recipe(path: str) -> dict[str, Any]:
    """The recipe's mapping (YAML, safe loader); a missing, unreadable or malformed file, or one that is not a
    mapping, refused in one line."""
    import yaml

    where = f"--config {path}"
    if not os.path.isfile(path):
        raise ConfigError(where, "no such file", "check the path of the recipe")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(where, f"cannot be read as YAML ({' '.join(str(err).split())})", FIX) from err
    if not isinstance(recipe, dict):
        raise ConfigError(where, f"must hold a mapping of flag names to values, not a {type(recipe).__name__}", FIX)
    return recipe


def check_recipe(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Refuse a recipe value of the wrong type for its flag (see the module docstring); no recipe: nothing."""
    path = recipe_path(argv)
    if path is None:
        return
    recipe = load_recipe(path)
    for key, value in recipe.items():
        action = _action(parser, str(key))
        if key == "env" or action is None:
            continue
        expected = problem(action, value)
        if expected:
            quote = isinstance(value, bool) and action.choices is not None
            fix = "quote the value: YAML reads yes/no/on/off as booleans" if quote else FIX
            raise ConfigError(f"--config {path}", f"key {key!r} is {value!r} ({_kind(value)}); expected {expected}",
                              fix)  # fmt: skip


def problem(action: argparse.Action, value: Any) -> str | None:
    """What `value` should have been for the flag of `action` (words), or None when the flag accepts it. None (YAML's
    `null`) is accepted where the flag's default is None."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and _type_name(action) != "str"):
        return None if action.default is None else f"{_expected(action)} (its default is {action.default!r})"
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        if not isinstance(value, list):
            return f"a list ({_expected(action, single=True)} each), e.g. [{value}]"
        bad = [item for item in value if _scalar_problem(action, item)]
        return f"a list of {_expected(action, single=True)} (not {bad[0]!r})" if bad else None
    return _expected(action) if _scalar_problem(action, value) else None


def _scalar_problem(action: argparse.Action, value: Any) -> bool:
    """Whether one value does not fit the flag's type and choices."""
    kind = _type_name(action)
    if kind == "string_to_bool":
        return not isinstance(value, bool) and not (isinstance(value, str) and value.lower() in TRUTHY)
    if kind in ("int", "float"):
        if isinstance(value, bool) or (kind == "int" and isinstance(value, float)):
            return True
        if isinstance(value, str):
            try:
                (int if kind == "int" else float)(value)
            except ValueError:
                return True
            return False
        return not isinstance(value, int | float)
    if action.choices is not None:
        return not isinstance(value, str) or value not in {str(choice) for choice in action.choices}
    return False  # str-typed flags also take mappings (model_init_kwargs) and lists (report_to): TRL checks those


def _type_name(action: argparse.Action) -> str:
    """The name of the flag's converter: `int`, `float`, `string_to_bool`, ... (TRL's parser wraps the converter of an
    optional field, keeping its name)."""
    return getattr(action.type, "__name__", "")


def _expected(action: argparse.Action, single: bool = False) -> str:
    """The type a flag takes, in words."""
    kind = _type_name(action)
    if kind == "string_to_bool":
        words = "true or false"
    elif kind == "int":
        words = "an integer"
    elif kind == "float":
        words = "a number"
    elif action.choices is not None:
        words = "one of " + ", ".join(str(choice) for choice in action.choices)
    else:
        words = "a string"
    if not single and (action.nargs in ("+", "*")):
        return f"a list of {words}"
    return words


def _kind(value: Any) -> str:
    """A YAML value's type in the recipe's words."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


def _action(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    """The flag `--key` sets (its store action, not a `--no_key`), None for a key that is no flag."""
    for action in parser._actions:
        if action.dest == key and f"--{key}" in action.option_strings:
            return action
    return None
