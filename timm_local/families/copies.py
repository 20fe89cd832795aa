"""Generic auxiliary copies: a primary block's architecture, freshly initialised, fed through a projection.

A block of an arbitrary timm model keeps no record of its constructor arguments, and many cannot
be rebuilt with another input width or stride (a Swin block's attention mask is built for one
resolution, a LeViT block's attention biases for one token grid). So the generic family copies
block j *exactly* -- ``copy.deepcopy`` of its modules, then every parameter re-drawn -- and adapts
the auxiliary network's features to what block j expects with a :class:`ShapeProjection` in front
when the two differ (docs/method.md, "the shape rule"). The copy never shares or keeps a weight of
the primary block.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # (partition imports the families)
    from ..partition import BlockSpec

__all__ = ["ShapeProjection", "fresh_copy", "reinitialise"]


def _model_init(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """The model's own per-module init (timm's ``model._init_weights(m)``), when it has one."""
    init = getattr(model, "_init_weights", None)
    if not callable(init):
        return None
    required = [p for p in inspect.signature(init).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) == 1:
        return init
    if len(required) == 2:  # (module, name)
        return lambda m: init(m, "")
    return None


def reinitialise(module: nn.Module, model: nn.Module) -> None:
    """Re-draw every parameter (and reset running statistics) of ``module``, a copy of part of ``model``.

    In order: each submodule's own ``reset_parameters()`` (PyTorch layers, timm layers such as
    LayerScale), then the model's own per-module init where timm has one (``_init_weights``: e.g.
    ViT's truncated-normal linears). A parameter neither touched -- a bare ``nn.Parameter`` of a
    model's own block class -- is re-drawn as timm initialises such tensors by default: truncated
    normal (std 0.02) when it is a matrix or more, its original constant when it was constant
    (a layer-scale ``gamma``), else normal (std 0.02). Which tensors were written is read from
    their version counters, so a deliberate constant init (ones, zeros) counts as re-initialised.
    """
    params = list(module.named_parameters())
    versions = {id(p): p._version for _, p in params}
    constant = {id(p): _is_constant(p) for _, p in params}
    init = _model_init(model)
    with torch.no_grad():
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and not inspect.signature(reset).parameters:
                reset()
        if init is not None:
            module.apply(init)
        for _, p in params:
            if p._version != versions[id(p)]:
                continue
            if p.ndim >= 2:
                nn.init.trunc_normal_(p, std=0.02)
            elif constant[id(p)] is not None:
                p.fill_(constant[id(p)])
            else:
                nn.init.normal_(p, std=0.02)


def _is_constant(p: torch.Tensor) -> float | None:
    """The value of a tensor whose entries are all equal (a constant init), else None."""
    if p.numel() == 0:
        return None
    flat = p.detach().flatten()
    return float(flat[0]) if bool((flat == flat[0]).all()) else None


def fresh_copy(block: nn.Module, model: nn.Module) -> nn.Module:
    """``block``'s architecture with new weights: a deep copy, re-initialised (:func:`reinitialise`).

    Running the copy in eval mode on the primary's input gives the primary's output shape; nothing
    in it is shared with (or equal to a trained value of) the primary block.
    """
    clone = copy.deepcopy(block)
    reinitialise(clone, model)
    return clone


def _grid(spec: "BlockSpec") -> tuple[int, int] | None:
    """(H, W) of a block output laid out on a spatial grid; tokens form one only if their count is square."""
    if spec.layout == "NCHW":
        return spec.shape[1], spec.shape[2]
    if spec.layout == "NHWC":
        return spec.shape[0], spec.shape[1]
    side = math.isqrt(spec.shape[0])
    return (side, side) if side * side == spec.shape[0] else None


#: At most this many leading (class / register) tokens are added or dropped by a projection.
MAX_LEADING_TOKENS = 16


class ShapeProjection(nn.Module):
    """Maps features shaped like ``source``'s output to the shape ``target``'s output has.

    Spatially: a subsampling by the integer ratio of the two grids (the stride the downsampling
    deficit asks for), or an adaptive average pool when the ratio is not an integer. Channels: a
    1x1 convolution + BatchNorm into a feature map (NCHW), a linear layer into channels-last maps
    and tokens ("a linear for token models"). Token sequences that are no square grid (they carry
    class / register tokens) are projected channel-wise; when the copied block expects a few more
    leading tokens than the source has (a class token joins mid-network, as in ConViT), fresh
    learned ones are prepended, and when it expects fewer, the leading ones are dropped.
    """

    def __init__(self, source: "BlockSpec", target: "BlockSpec") -> None:
        super().__init__()
        self.source_layout, self.target_layout = source.layout, target.layout
        self.target_grid = _grid(target)
        source_grid = _grid(source)
        self.leading = 0  # tokens to prepend (> 0) or to drop (< 0)
        tokens = source.layout == target.layout == "NLC" and (source_grid is None or self.target_grid is None)
        if tokens and abs(target.shape[0] - source.shape[0]) <= MAX_LEADING_TOKENS:
            self.target_grid = None  # channels only (+ leading tokens)
            self.leading = target.shape[0] - source.shape[0]
        elif source_grid is None or self.target_grid is None:
            raise ValueError(
                f"cannot project block {source.name!r}'s output {source.shape} ({source.layout}) to the input "
                f"{target.shape} ({target.layout}) of a copy of the block after {target.name!r}: a token "
                "sequence with class tokens has no grid to resample")
        self.source_grid = None if self.target_grid is None else source_grid
        self.stride = None
        if self.target_grid is not None and self.source_grid != self.target_grid:
            (h, w), (th, tw) = self.source_grid, self.target_grid
            if h % th == 0 and w % tw == 0 and h // th == w // tw:
                self.stride = h // th
        if target.layout == "NCHW":
            self.conv = nn.Conv2d(source.out_chs, target.out_chs, 1, stride=self.stride or 1, bias=False)
            self.norm = nn.BatchNorm2d(target.out_chs)
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.linear = nn.Linear(source.out_chs, target.out_chs)
        if self.leading > 0:
            self.tokens = nn.Parameter(torch.zeros(1, self.leading, target.out_chs))
            nn.init.trunc_normal_(self.tokens, std=0.02)

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_layout == "NHWC":
            return x.permute(0, 3, 1, 2)
        if self.source_layout == "NLC":
            h, w = self.source_grid
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_grid is None:  # tokens -> tokens, channel-wise
            x = self.linear(x)
            if self.leading > 0:
                return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)
            return x[:, -self.leading:] if self.leading < 0 else x
        x = self._to_nchw(x)
        if self.target_grid != tuple(x.shape[-2:]) and self.stride is None:
            x = F.adaptive_avg_pool2d(x, self.target_grid)
        if self.target_layout == "NCHW":
            return self.norm(self.conv(x))
        if self.stride:
            x = x[:, :, :: self.stride, :: self.stride]
        x = self.linear(x.permute(0, 2, 3, 1))
        return x.flatten(1, 2) if self.target_layout == "NLC" else x
