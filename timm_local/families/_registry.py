"""Registry of family adapters keyed by model class."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import torch.nn as nn


class FamilyAdapter(ABC):
    """How to cut one family of models into local blocks and copy their architecture."""

    name: ClassVar[str]
    model_classes: ClassVar[tuple[type, ...]]

    @abstractmethod
    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of every local block in execution order; the stem is block 0.

        Running them in order must equal ``model.forward_features``. Modules must be the
        model's own (no copies). A stem made of several modules is returned as an
        ``nn.Sequential`` over those modules.
        """

    @abstractmethod
    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        """A new, untrained block of ``block``'s type and configuration: in_chs -> out_chs at ``stride``."""


_ADAPTERS: dict[type, FamilyAdapter] = {}
_A = TypeVar("_A", bound=type[FamilyAdapter])


def register_family(adapter_cls: _A) -> _A:
    """Class decorator: register an adapter for every class in its ``model_classes``."""
    adapter = adapter_cls()
    for cls in adapter_cls.model_classes:
        _ADAPTERS[cls] = adapter
    return adapter_cls


def list_families() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted({a.name for a in _ADAPTERS.values()})


def adapter_for(model: nn.Module) -> FamilyAdapter:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    supported = ", ".join(
        f"{a.name} ({'/'.join(c.__name__ for c in a.model_classes)})"
        for a in {id(a): a for a in _ADAPTERS.values()}.values()
    )
    raise NotImplementedError(
        f"timm_local cannot cut a {type(model).__name__} into local blocks: no family adapter is "
        f"registered for it. Supported families: {supported}. To add one, subclass "
        "timm_local.families.FamilyAdapter and decorate it with @timm_local.register_family "
        "(see docs/families.md)."
    )
