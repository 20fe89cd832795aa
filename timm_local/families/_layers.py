"""Recover the layer factories (norm, activation, padding) a timm block was built with.

timm blocks keep no record of their constructor arguments, so a family adapter that must build
"a fresh block like this one" with other channel counts reads them back from the block's own
modules. These helpers do that once for all adapters, and fail loudly (instead of silently
substituting a default) when a layer cannot be recovered.
"""
from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn
from timm.layers import Conv2dSame
from timm.layers.norm_act import GroupNorm1Act, GroupNormAct


def act_layer_of(norm_act: nn.Module) -> type[nn.Module] | None:
    """The activation class inside a timm norm+act layer (``BatchNormAct2d`` etc.), or None.

    None means the layer was built with ``apply_act=False`` (its ``act`` is an ``Identity``).
    """
    act = getattr(norm_act, "act", None)
    if act is None:
        raise TypeError(
            f"{type(norm_act).__name__} is not a timm norm+act layer (no .act); cannot recover the "
            "block's activation"
        )
    return None if isinstance(act, nn.Identity) else type(act)


def norm_layer_like(norm: nn.Module, model: nn.Module | None = None) -> functools.partial:
    """A factory ``f(num_channels, **kw)`` that builds a norm layer configured like ``norm``.

    Keeps the class and its numeric settings (eps, momentum, grouping); the activation is not
    bound, so timm's ``get_norm_act_layer(factory, act_layer)`` can rebind it as a block does.
    For group norms the grouping rule is ambiguous from one layer (fixed ``num_groups`` or fixed
    ``group_size``); ``model`` resolves it: a constant group count across the model's group
    norms means fixed ``num_groups``, otherwise a fixed ``group_size``.
    """
    kwargs: dict[str, Any] = {}
    if hasattr(norm, "eps"):
        kwargs["eps"] = norm.eps
    if isinstance(norm, nn.modules.batchnorm._NormBase):
        kwargs["momentum"] = norm.momentum
    if isinstance(norm, GroupNorm1Act):
        pass  # one group by definition
    elif isinstance(norm, (nn.GroupNorm, GroupNormAct)):
        counts = {m.num_groups for m in (model or norm).modules() if isinstance(m, nn.GroupNorm)}
        if len(counts) == 1:
            kwargs["num_groups"] = norm.num_groups
        else:
            kwargs["group_size"] = norm.num_channels // norm.num_groups
    elif not isinstance(norm, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
        raise NotImplementedError(
            f"cannot recover the configuration of norm layer {type(norm).__name__}; supported: "
            "batch norm, group norm and layer norm (with or without a fused activation)"
        )
    return functools.partial(type(norm), **kwargs)


def pad_type_of(model: nn.Module) -> str:
    """timm's ``pad_type`` for the model: 'same' (TF ports, dynamic padding) or '' (symmetric).

    Read from the model rather than the block, because a TF-'same' stride-1 conv is built as a
    plain ``nn.Conv2d`` with static padding and looks symmetric on its own.
    """
    return "same" if any(isinstance(m, Conv2dSame) for m in model.modules()) else ""


def act_like(act: nn.Module) -> nn.Module:
    """A new activation of the same class and in-place setting as ``act`` (activations hold no weights)."""
    if hasattr(act, "inplace"):
        return type(act)(inplace=act.inplace)
    return type(act)()
