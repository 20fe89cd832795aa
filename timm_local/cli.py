"""How the command-line tools (``tools/*.py``) report errors: a user error is one line on stderr, exit code 2.

A traceback is for bugs. For a wrong flag, a missing or corrupt file, or a refused resume, the message
already says what is wrong and what to do; the stack above it only hides that. ``--debug`` (any tool) or
``TIMM_LOCAL_DEBUG=1`` re-raises instead, to show the traceback.

No project imports at module level: :mod:`timm_local.config` uses :class:`ArgumentParser`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

__all__ = ["ArgumentParser", "DEBUG_ENV", "DEBUG_FLAG", "UsageError", "command_line_errors", "handle_errors",
           "library_errors", "one_line"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TIMM_LOCAL_DEBUG"

#: An error table: (exception class, exit code), first match wins.
ErrorCodes = Sequence[tuple[type, int]]


class UsageError(ValueError):
    """A command line argparse rejects (unknown flag, missing argument, invalid choice)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` (reported in one line) instead of printing the
    usage text and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    A DataLoader worker's exception comes back re-raised with the worker's traceback as its message; its last
    line is the original ``module.Class: message``.
    """
    text = str(error) or type(error).__name__
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug(argv: Optional[Sequence[str]]) -> tuple[Optional[list[str]], bool]:
    """``argv`` without ``--debug`` (also taken out of ``sys.argv`` when ``argv`` is None), and whether it or
    the environment switch asked for tracebacks (exported, so nested handlers and launched processes see it)."""
    if argv is None:
        if DEBUG_FLAG in sys.argv[1:]:
            sys.argv[1:] = [a for a in sys.argv[1:] if a != DEBUG_FLAG]
            os.environ[DEBUG_ENV] = "1"
    elif DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    return (None if argv is None else list(argv)), os.environ.get(DEBUG_ENV, "") not in ("", "0")


def handle_errors(main: Callable[[Optional[list[str]]], Any], argv: Optional[Sequence[str]], codes: ErrorCodes) -> int:
    """``main(argv)``, reporting the errors of ``codes`` as one line on stderr with their exit code.

    ``argv`` None means the command line (``sys.argv``, from which ``--debug`` is removed). Returns main's
    exit code (0 for None).
    """
    args, debug = _debug(argv)
    try:
        result = main(args)
    except tuple(cls for cls, _ in codes) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return next(code for cls, code in codes if isinstance(e, cls))
    return int(result or 0)


def library_errors() -> tuple[type, ...]:
    """The library's own user-error classes (bad config, data or checkpoint, refused resume or overwrite)."""
    from .config import ConfigError
    from .data import CorruptImageError, DatasetNotFoundError
    from .training import CheckpointError, CheckpointMismatchError

    return (UsageError, ConfigError, DatasetNotFoundError, CorruptImageError, CheckpointError,
            CheckpointMismatchError, FileNotFoundError, FileExistsError)


def command_line_errors() -> ErrorCodes:
    """At the command line every error a user's input can cause is one line, exit code 2: the library's, and
    the ValueError / OSError its dependencies raise for bad input (``--debug`` shows where)."""
    return [(cls, 2) for cls in (*library_errors(), ValueError, OSError)]
