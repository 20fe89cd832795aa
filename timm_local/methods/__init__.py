"""Local learning rules, in a registry by name (``list_methods()``).

``__all__`` is what a new rule needs (docs/contributing.md, "A local learning rule"): the classes it
subclasses or returns (:class:`LocalMethod`, :class:`LocalStage`, :class:`LocalHead`) and the registry
(:func:`register_method`, :func:`create_method`, :func:`list_methods`). The rules themselves are reached
through the registry by name, never imported.
"""
from .base import (
    LocalHead,
    LocalMethod,
    LocalStage,
    create_method,
    list_methods,
    register_method,
    single_stage_for_all,
)
from . import bp as _bp  # noqa: F401  (registers)
from . import auglocal as _auglocal  # noqa: F401
from . import checkpoint as _checkpoint  # noqa: F401
from . import dgl as _dgl  # noqa: F401
from . import predsim as _predsim  # noqa: F401
from . import infopro as _infopro  # noqa: F401
from . import auglocal_infopro as _auglocal_infopro  # noqa: F401
from . import man as _man  # noqa: F401 (man, man_pp)
from . import hpff as _hpff  # noqa: F401

__all__ = [
    "LocalHead",
    "LocalMethod",
    "LocalStage",
    "create_method",
    "list_methods",
    "register_method",
    "single_stage_for_all",
]
