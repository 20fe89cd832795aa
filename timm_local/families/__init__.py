"""Family adapters: the only code that knows a model family's module names.

An adapter says, for one family of timm models, (1) which modules are the local blocks, in
execution order, and (2) how to build a fresh block "like block j" with a given input width
and stride. Adapters are looked up by the model's class, following its MRO, so a subclass of a
supported model works too; the generic family, registered for ``nn.Module``, takes every timm
model no specific family does. See docs/families.md for registering your own.

``__all__`` is what a new adapter needs: the base class, the registry and the error a model no adapter
takes raises; the generic cut's graph machinery is internal.
"""
from ._registry import (FamilyAdapter, UnsupportedModelError, adapter_for, list_families, register_family,
                        unregister_family)
from . import resnet as _resnet  # noqa: F401  (registers the adapter)
from . import cifar_vgg as _cifar_vgg  # noqa: F401
from . import efficientnet as _efficientnet  # noqa: F401
from . import regnet as _regnet  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from . import generic as _generic  # noqa: F401  (the fallback, registered for nn.Module)

__all__ = ["FamilyAdapter", "UnsupportedModelError", "adapter_for", "list_families", "register_family", "unregister_family"]
