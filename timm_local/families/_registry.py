"""Registry of family adapters keyed by model class."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence, TypeVar

import torch.nn as nn

from ..errors import UserError
from ..registry import Registry
from .spec import BlockSpec, PartitionView


class UnsupportedModelError(UserError, NotImplementedError):
    """A model timm_local cannot cut into local blocks: the message says why, lists the supported families
    and how to add one."""


class FamilyAdapter(ABC):
    """How to cut one family of models into local blocks and copy their architecture."""

    name: ClassVar[str]
    model_classes: ClassVar[tuple[type, ...]]
    #: How AugLocal's auxiliary copies are built. "paper": :meth:`make_block_like` builds a block of
    #: the primary's type for any input width and stride 1 or 2 (docs/spec.md §2.4-2.5). "shape": a
    #: copy only accepts its primary block's own input shape, so a projection adapts the auxiliary
    #: network's features to it (:meth:`make_shaped_copy`; the generic family, docs/method.md).
    copy_rule: ClassVar[str] = "paper"

    def supports(self, model: nn.Module) -> bool:
        """Whether this adapter can cut ``model``; if not, lookup continues along the MRO.

        A family adapter that copies only some of its class's block types says no for models built
        from others (e.g. a ``ResNet`` of Res2Net blocks), so the generic family takes them.
        """
        return True

    def cut(self, model: nn.Module, input_size: Sequence[int]) -> list[tuple[str, nn.Module]]:
        """The local blocks for ``(C, H, W)`` inputs; :meth:`local_blocks` unless the cut depends on the size."""
        return self.local_blocks(model)

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

    def make_shaped_copy(self, partition: PartitionView, index: int, source: BlockSpec) -> nn.Module:
        """For ``copy_rule == "shape"``: a fresh copy of block ``index`` fed with ``source``-shaped features."""
        raise NotImplementedError(f"the {self.name!r} family builds copies with make_block_like (copy_rule 'paper')")


#: Adapters by model class; :func:`adapter_for` walks a model's MRO through it (its own error, not ``lookup``'s).
_ADAPTERS: Registry[type, FamilyAdapter] = Registry()
_A = TypeVar("_A", bound=type[FamilyAdapter])


def register_family(adapter_cls: _A) -> _A:
    """Class decorator: register an adapter for every class in its ``model_classes``."""
    adapter = adapter_cls()
    for cls in adapter_cls.model_classes:
        _ADAPTERS.register(cls, adapter)
    return adapter_cls


def unregister_family(adapter_cls: type[FamilyAdapter]) -> None:
    """Remove what ``register_family(adapter_cls)`` registered (an experiment in a notebook or a test)."""
    for cls in adapter_cls.model_classes:
        if type(_ADAPTERS.get(cls)) is adapter_cls:
            _ADAPTERS.unregister(cls)


def list_families() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted({a.name for a in _ADAPTERS.values()})


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The first adapter along the model's MRO that supports it (the generic family is registered
    for ``nn.Module``, so it is the fallback of every model no specific family takes)."""
    for cls in type(model).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None and adapter.supports(model):
            return adapter
    raise UnsupportedModelError(unsupported_message(model, "no family adapter is registered for it"))


def unsupported_message(model: nn.Module, reason: str) -> str:
    """The error text for a model timm_local cannot cut: why, the supported families, how to add one."""
    supported = ", ".join(
        f"{a.name} ({'/'.join(c.__name__ for c in a.model_classes)})"
        for a in {id(a): a for a in _ADAPTERS.values()}.values()
    )
    return (
        f"timm_local cannot cut a {type(model).__name__} into local blocks: {reason}. Supported "
        f"families: {supported}. To add one, subclass timm_local.families.FamilyAdapter and decorate it "
        "with @timm_local.register_family (see docs/families.md)."
    )
