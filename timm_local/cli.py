"""The command line of the tools (``tools/*.py``): the training flags, and how errors are reported.

Flags: every :class:`~timm_local.config.TrainConfig` key is a flag (``batch_size`` <-> ``--batch-size``),
built here from the dataclass, with timm's spellings (:mod:`timm_local.timm_options`); what the values
mean, their precedence and their validation are :mod:`timm_local.config`'s.

Errors: a user error (:class:`~timm_local.errors.UserError`) is one line on stderr, exit code 2. A
traceback is for bugs. For a wrong flag, a missing or corrupt file, or a refused resume, the message
already says what is wrong and what to do; the stack above it only hides that. ``--debug`` (any tool) or
``TIMM_LOCAL_DEBUG=1`` re-raises instead, to show the traceback.

Why nothing heavier than the config: the parser and the error report need nothing more, and the module
stays at the top of the layers (tests/project/test_layers.py). Torch still loads first, because importing the
package registers the ``*_cifar`` models in timm's registry, which timm users expect from ``import timm_local``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any, Callable, NoReturn, Optional, Sequence

from .config import TrainConfig, key_types, resolve_config, unwrap_optional
from .errors import UsageError, UserError
from .timm_options import FLAG_ALIASES, add_timm_flags, timm_flag_values

__all__ = ["ArgumentParser", "DEBUG_ENV", "DEBUG_FLAG", "UsageError", "build_parser", "command_line_errors",
           "handle_errors", "library_errors", "one_line", "parse_config"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TIMM_LOCAL_DEBUG"

#: An error table: (exception class, exit code), first match wins.
ErrorCodes = Sequence[tuple[type, int]]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` (reported in one line) instead of printing the
    usage text and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def build_parser(description: Optional[str] = None) -> ArgumentParser:
    """An argparse parser with ``--config`` and one flag per :class:`TrainConfig` field.

    Flags default to ``SUPPRESS`` so that only the flags actually given override the YAML. A usage error
    is a :class:`~timm_local.errors.UsageError` (one line), not argparse's usage text and exit.
    """
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", "-c", action="append", default=[],
                        help="YAML recipe (repeatable; later files override earlier ones)")
    types_ = key_types()
    for f in fields(TrainConfig):
        base, _ = unwrap_optional(types_[f.name])
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        flags += FLAG_ALIASES.get(f.name, ())
        help_ = f.metadata.get("help", "")
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:  # list and dict keys take several words: --mean 0.5 0.5 0.5, --model-kwargs drop_rate=0.1
            parser.add_argument(*flags, dest=f.name, type=str, metavar=f.name.upper(), help=help_,
                                nargs="+" if base in (list, dict) else None)
    add_timm_flags(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> TrainConfig:
    """The configuration a command line asks for: defaults < ``--config`` files (in order) < explicit flags
    (a resume without ``--config`` continues from the run's own config, :func:`~timm_local.config.resolve_config`)."""
    args = timm_flag_values(vars(build_parser(description).parse_args(argv)), key_types())
    return resolve_config(args.pop("config", []), args)


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
    """The errors a user can fix: the library's own (:class:`UserError`: bad flag, config, data or checkpoint,
    refused resume or overwrite) and a missing or existing file."""
    return (UserError, FileNotFoundError, FileExistsError)


def command_line_errors() -> ErrorCodes:
    """At the command line every error a user's input can cause is one line, exit code 2: the library's, and
    the ValueError / OSError its dependencies raise for bad input (``--debug`` shows where)."""
    return [(cls, 2) for cls in (*library_errors(), ValueError, OSError)]
