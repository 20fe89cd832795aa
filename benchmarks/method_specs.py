"""The ``--methods`` list of the cost benchmarks (``"bp,dgl,auglocal:3,man@4"``): which methods, with which d
and how many local modules K.

One parser for ``benchmarks/cost_table.py`` and ``benchmarks/real_memory.py``, whose ratios are all
relative to BP, so that both read the list and label their rows the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm_local


@dataclass
class MethodSpec:
    """One row of a table: a registered method and its hyper-parameters."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        label = f"{self.method} d={self.kwargs['aux_depth']}" if "aux_depth" in self.kwargs else self.method
        return f"{label} K={self.kwargs['local_modules']}" if "local_modules" in self.kwargs else label


def parse_methods(text: str) -> list[MethodSpec]:
    """``"bp,dgl,auglocal:3,man@4"`` -> method specs; ``name:d`` sets ``aux_depth`` = d, ``name@K`` sets
    ``local_modules`` = K (both: ``auglocal:3@4``); the first must be bp."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        item, _, modules = item.partition("@")
        name, _, depth = item.partition(":")
        if name not in timm_local.list_methods():
            raise SystemExit(f"unknown method {name!r} in --methods; registered: {', '.join(timm_local.list_methods())}")
        kwargs = {"aux_depth": int(depth)} if depth else {}
        if modules:
            kwargs["local_modules"] = int(modules)
        specs.append(MethodSpec(name, kwargs))
    if not specs or specs[0].method != "bp":
        raise SystemExit("--methods must start with 'bp': every ratio is relative to it")
    return specs
