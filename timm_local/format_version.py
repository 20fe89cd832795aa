"""The run format's version: one integer in every ``checkpoint_meta.json``, ``config.yaml`` and export.

Why a leaf module: the run folder is read at three layers -- the configuration (a resume continues from
``config.yaml``), the export (its metadata) and the training package (checkpoints) -- and each must refuse
a folder written by a newer timm_local in the same words, without importing the others. What each version
holds and how an older one is brought to the current one is :mod:`timm_local.training.run_format`
(docs/run_format.md).

Versions: 1 = Accelerate's pickle checkpoints; 2 = safetensors checkpoints; 3 = ``format_version`` recorded,
each value stored once (the checkpoint's configuration only under ``config``, the export's method
hyper-parameters only under ``method_config``).
"""
from __future__ import annotations

from typing import Any, Mapping

from .errors import UserError

__all__ = ["FORMAT_VERSION", "RunFormatError", "VERSION_KEY", "check_readable", "version_of"]

#: The version this code writes (and the newest it reads).
FORMAT_VERSION = 3
#: The key that holds it, in ``checkpoint_meta.json``, ``config.yaml`` and the export's metadata.
VERSION_KEY = "format_version"


class RunFormatError(UserError, ValueError):
    """A run folder, checkpoint or export of a run-format version this code cannot read."""


def check_readable(version: Any, what: str) -> int:
    """``version`` as an int if this code reads it, else a :class:`RunFormatError` naming ``what`` and the fix."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunFormatError(f"{what} has {VERSION_KEY} {version!r}, not a run-format version (a positive integer); "
                             f"the file was edited or damaged: restore it from the run's copy")
    if version > FORMAT_VERSION:
        raise RunFormatError(f"{what} was written by a newer timm_local (run format {version}; this one reads up to "
                             f"{FORMAT_VERSION}): upgrade timm_local (pip install -U timm_local) to read it")
    return version


def version_of(stored: Mapping[str, Any], what: str, before_versions: int) -> int:
    """The run-format version of a stored mapping: its :data:`VERSION_KEY`, or ``before_versions`` -- the
    version its kind of file had before versions were recorded -- when it has none."""
    return check_readable(stored.get(VERSION_KEY, before_versions), what)
