"""The one base class of the errors a user's input can cause, and the command line's own.

Why a leaf module: every layer raises user errors (a bad flag, config, dataset, checkpoint or weights
file), and the command line reports them all the same way -- one line, exit code 2 (timm_local.cli).
With the base here, the command line catches :class:`UserError` without importing the layers that raise
it, and no layer imports the command line to raise one.
"""
from __future__ import annotations

__all__ = ["UsageError", "UserError"]


class UserError(Exception):
    """An error the user can fix; the message names what is wrong and what to do. The command-line tools
    print it as one line and exit with code 2 (``--debug`` shows the traceback)."""


class UsageError(UserError, ValueError):
    """A command line argparse rejects (unknown flag, missing argument, invalid choice)."""
