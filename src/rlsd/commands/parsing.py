"""What every `rlsd` parser shares (issue 27): each long flag in both spellings (TRL's `--max_prompt_length`, the
`--greedy-only` of `rlsd bench`), and a bad or unknown flag named in one line instead of the whole usage; and which
exceptions are errors a person can act on (one line on stderr, exit status 2) rather than bugs (a traceback).

Light on purpose: `rlsd --help` imports this module, never torch."""

from __future__ import annotations

import argparse
import dis
import sys
from pathlib import Path
from typing import NoReturn, TypeVar

Parser = TypeVar("Parser", bound=argparse.ArgumentParser)
PACKAGE = Path(__file__).resolve().parents[1]
"""The rlsd package folder: a ValueError raised by a `raise` statement in a file under it is one of rlsd's checks."""


def command_line(parser: Parser) -> Parser:
    """`parser` and its subcommands' parsers, each long flag accepted with dashes and with underscores (the other
    spelling is not listed by --help, and an abbreviation matching both still names one flag), and argument errors
    printed as one line, `PROG: error: MESSAGE (see PROG --help)`, with exit status 2 as argparse's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                command_line(sub)
        for option in action.option_strings:
            if option.startswith("--"):
                for other in ("--" + option[2:].replace("_", "-"), "--" + option[2:].replace("-", "_")):
                    parser._option_string_actions.setdefault(other, action)
    find = parser._get_option_tuples

    def one_per_action(option_string: str) -> list:
        """argparse's prefix matches, one per flag (two spellings of a flag would read as an ambiguous prefix)."""
        found = {id(match[0]): match for match in find(option_string)}
        return list(found.values())

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {one_line(message)} (see {parser.prog} --help)\n")

    parser._get_option_tuples = one_per_action  # type: ignore[method-assign]
    parser.error = error  # type: ignore[method-assign]
    return parser


def one_line(text: str) -> str:
    """`text` on one line: its non-blank lines joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def actionable(err: BaseException) -> bool:
    """Whether `err` is an error a person can act on: rlsd's named errors (`rlsd.infra.validate`: a bad input,
    flag, dataset, model or output folder, checkpoint, a reward that failed, a non-finite loss), a full disk while
    saving, or a ValueError / FileNotFoundError that one of rlsd's own checks raised. Anything else is a bug."""
    from rlsd.infra.validate import InputError, NonFiniteError, RewardError

    if isinstance(err, InputError | NonFiniteError | RewardError):
        return True
    checkpoint = sys.modules.get("rlsd.infra.checkpoint")  # loaded whenever its DiskFullError can have been raised
    if checkpoint is not None and isinstance(err, checkpoint.DiskFullError):
        return True
    return isinstance(err, ValueError | FileNotFoundError) and raised_by_rlsd(err)


def raised_by_rlsd(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is a `raise` statement in rlsd's own source (a check), not
    a call that failed there (`int("x")`) nor code of another package or of the user."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not Path(code.co_filename).resolve().is_relative_to(PACKAGE):
        return False
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))
