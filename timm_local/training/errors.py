"""The checkpoint errors a user can meet, in one place so that every checkpoint module can raise them."""
from __future__ import annotations

from ..errors import UserError

__all__ = ["CheckpointError", "CheckpointWriteError", "UnsafePickleError"]


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as it is: a file missing, truncated or unreadable (named in the message)."""


class UnsafePickleError(CheckpointError):
    """A checkpoint file that is a pickle naming code (which loading it would run): refused unless trusted."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or export that could not be written (full or read-only disk): the message names the path and
    the errno, and the previous checkpoint is intact."""
