"""What every entry point shares: bad input becomes one ``error: ...`` line and exit code 2.

``--debug`` prints the traceback first. Argument errors are one line too (argparse prints its usage
block first; here the usage is one ``--help`` away).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable

# Errors whose message is written for the user (a bad file, key or value; a loss that became NaN): shown as is.
INPUT_ERRORS = (ValueError, OSError, LookupError, FloatingPointError)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``--debug`` and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a user-given name that becomes a file or folder name
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal colour and cursor codes other libraries put in messages


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``; argparse's error then names the flag as the user typed it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (tracebacks of nested tools can carry newlines), without terminal
    escape codes and without an ``error:`` prefix of its own (the entry point adds one)."""
    text = " ".join(_ANSI.sub("", str(err)).split())
    while text.lower().startswith("error:"):
        text = text[len("error:"):].lstrip()
    if isinstance(err, INPUT_ERRORS) or not text:
        return text or type(err).__name__
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)"


def run_entry_point(body: Callable[[], int | None], debug: bool, interrupted: str = "interrupted") -> int:
    """Run ``body`` and turn its exceptions into one ``error:`` line and an exit code.

    Args:
        body: the command's work; returns an exit code (None = 0).
        debug: print the traceback before the error line.
        interrupted: the line printed on Ctrl-C (say how to go on).

    Returns:
        ``body``'s code, 2 for an error, 130 for Ctrl-C.
    """
    try:
        return body() or 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
