"""How timm's feature wrappers rename a model's modules, in one place.

``FeatureListNet`` / ``FeatureDictNet`` (what ``features_only=True`` builds for most CNNs) re-register
the model's children with one ``Sequential`` level flattened: ``layer1.0`` becomes ``layer1_0``;
model-specific feature classes keep the model's names. Both the freezing of early stages (which needs
a wrapper name from ``feature_info``) and the exact-load check (which needs the model's name for a
wrapper key) follow this one rule. :func:`stride_feature_name` is the other naming rule of the plug-in:
what detectron2 calls a feature of a given stride.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

__all__ = ["flattened_name", "module_in_wrapper", "stride_feature_name", "wrapper_to_model_names"]


def flattened_name(name: str) -> str:
    """The name a feature wrapper gives the model's module ``name`` when it flattens one level."""
    return name.replace(".", "_", 1)


def module_in_wrapper(features: nn.Module, model_name: str) -> str:
    """The name, inside the feature wrapper ``features``, of the model's module ``model_name``."""
    names = dict(features.named_modules())
    for candidate in (model_name, flattened_name(model_name)):
        if candidate in names:
            return candidate
    raise ValueError(f"Cannot find module {model_name!r} in {type(features).__name__}.")


def wrapper_to_model_names(reference: nn.Module) -> dict[str, str]:
    """Map a feature wrapper's top-level module names back to the names in the full model ``reference``."""
    mapping: dict[str, str] = {}
    for name, child in reference.named_children():
        mapping[name] = name
        if isinstance(child, nn.Sequential):
            for sub, _ in child.named_children():
                mapping.setdefault(flattened_name(f"{name}.{sub}"), f"{name}.{sub}")
    return mapping


def stride_feature_name(stride: int) -> Optional[str]:
    """detectron2's name for a feature map of ``stride``: ``res<log2 stride>`` (``res2`` at stride 4, as in
    its own ResNets), or None when the stride is not a power of two (no detectron2 level matches it)."""
    level = int(math.log2(stride))
    return f"res{level}" if 2**level == stride else None
