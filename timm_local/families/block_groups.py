"""Which block each parameter of a timm model belongs to, as timm itself records it.

Every timm model family maintains ``model.group_matcher(coarse=False)``: regular expressions that
map each parameter name to its block, in execution order (the stem first; a stage's downsample
with the stage's first block; a final norm with the last block). timm uses it for layer-wise
learning-rate decay. It is the one per-model statement of "what a block is" that timm keeps for
all its ~100 model modules, so the generic family cuts along it (docs/families.md says why it is
preferred over ``feature_info`` and the feature extractors' module lists).

A few models have no matcher; for them :func:`_structural_groups` groups parameters by the
deepest indexed container element that holds at least two convolution / linear layers.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.models._manipulate import group_parameters

__all__ = ["compute_layers", "parameter_groups"]

_UNMATCHED = "\x00unmatched"  # a name no matcher matches: its group is timm's "everything else" group


def compute_layers(module: nn.Module) -> int:
    """Number of convolution and linear layers in ``module`` (what makes a block more than a norm)."""
    return sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules())


def parameter_groups(model: nn.Module) -> dict[str, Optional[int]]:
    """Parameter name -> block ordinal (execution order); None for parameters no block claims.

    Unclaimed parameters are those timm's matcher leaves to its catch-all group (the head, a
    neck): they belong to whatever block runs them.
    """
    matcher = getattr(model, "group_matcher", None)
    spec = None
    if callable(matcher):
        try:
            spec = matcher(coarse=False)
        except Exception:  # a matcher that needs a configuration the model lacks
            spec = None
    if not spec:
        return _structural_groups(model)
    names = [(n, p) for n, p in model.named_parameters()] + [(_UNMATCHED, None)]
    ids = group_parameters(_NamedList(names), spec, reverse=True)
    unmatched = ids.pop(_UNMATCHED)
    return {name: (None if group == unmatched else int(group)) for name, group in ids.items()}


class _NamedList:
    """Duck-types ``named_parameters()`` for timm's grouping helper (to add the sentinel name)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def named_parameters(self):
        return iter(self.items)


def _structural_groups(model: nn.Module) -> dict[str, Optional[int]]:
    """Fallback grouping: the deepest ``...<index>`` module on a parameter's path with >= 2 compute
    layers is its block; parameters on no such path are grouped by their top-level child."""
    modules = dict(model.named_modules())
    keys: dict[str, str] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")[:-1]
        key = parts[0] if parts else name
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            if parts[depth - 1].isdigit() and compute_layers(modules[prefix]) >= 2:
                key = prefix
                break
        keys[name] = key
    ordinals: dict[str, int] = {}
    for key in keys.values():
        ordinals.setdefault(key, len(ordinals))
    return {name: ordinals[key] for name, key in keys.items()}
