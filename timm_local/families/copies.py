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
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import BlockSpec

__all__ = ["ShapeProjection", "fresh_copy"]


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


def _reinitialise(module: nn.Module, model: nn.Module) -> None:
    """Re-draw every parameter (and reset running statistics) of ``module``, a copy of part of ``model``.

    In order: each submodule's own ``reset_parameters()`` (PyTorch layers, timm layers such as
    LayerScale), then the model's own per-module init where timm has one (``_init_weights``: e.g.
    ViT's truncated-normal linears). A parameter neither touched -- a bare ``nn.Parameter`` of a
    model's own block class: ConvNeXt's and CaiT's layer-scale ``gamma``, XCiT's ``temperature``,
    EfficientFormer's attention biases -- is re-drawn as timm initialises such tensors by default:
    truncated normal (std 0.02) when it is a matrix or more; a vector keeps its value only while the
    primary still holds one constant there (an untrained model: that is timm's init value) and is
    drawn normal (std 0.02) otherwise. Which tensors were written is read from their version
    counters, so a deliberate constant init (ones, zeros) counts as re-initialised.
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
    """``block``'s architecture with new weights: a deep copy, re-initialised (:func:`_reinitialise`).

    Running the copy in eval mode on the primary's input gives the primary's output shape; nothing
    in it is shared with (or equal to a trained value of) the primary block.
    """
    clone = copy.deepcopy(block)
    _reinitialise(clone, model)
    return clone


#: At most this many leading (class / register) tokens are recognised, added or dropped by a projection.
_MAX_LEADING_TOKENS = 16


def _token_grid(tokens: int) -> tuple[int, tuple[int, int]] | None:
    """(leading tokens, (side, side)): the fewest leading class / register tokens that leave a square
    grid of patch tokens (ViT: 197 = 1 + 14 x 14), or None."""
    for leading in range(min(_MAX_LEADING_TOKENS, tokens - 1) + 1):
        side = math.isqrt(tokens - leading)
        if side > 0 and side * side == tokens - leading:
            return leading, (side, side)
    return None


def _grid(spec: BlockSpec) -> tuple[int, tuple[int, int]] | None:
    """(leading tokens, (H, W)) of a block output, or None for a token sequence without a grid."""
    if spec.layout == "NCHW":
        return 0, (spec.shape[1], spec.shape[2])
    if spec.layout == "NHWC":
        return 0, (spec.shape[0], spec.shape[1])
    return _token_grid(spec.shape[0])


class ShapeProjection(nn.Module):
    """Maps features shaped like ``source``'s output to the shape ``target``'s output has.

    Spatially: a subsampling by the integer ratio of the two grids (the stride the downsampling
    deficit asks for), or an adaptive average pool when the ratio is not an integer. Channels: a
    1x1 convolution + BatchNorm into a feature map (NCHW), a linear layer into channels-last maps
    and tokens ("a linear for token models"). Tokens are read as leading class / register tokens
    plus a square grid of patch tokens; the leading ones are mapped channel-wise, and where the
    copied block expects more of them (a class token joins mid-network, as in ConViT) fresh learned
    ones are prepended, where it expects fewer the extra ones are dropped. A token sequence with no
    square grid is mapped channel-wise only, its length adjusted by the same leading-token rule.
    """

    def __init__(self, source: BlockSpec, target: BlockSpec) -> None:
        super().__init__()
        self.source_layout, self.target_layout = source.layout, target.layout
        src, tgt = _grid(source), _grid(target)
        #: Spatial grids (H, W) of the source and target features; None when one side is a token
        #: sequence without a grid, which is then mapped channel-wise only.
        self.source_grid: tuple[int, int] | None = None
        self.target_grid: tuple[int, int] | None = None
        #: Leading class / register tokens of the source and target (0 for feature maps).
        self.source_leading = self.target_leading = 0
        #: Without grids: tokens to prepend (> 0, fresh learned ones) or to drop at the front (< 0).
        self.length_change = 0
        #: The integer subsampling between the grids, or None (equal grids, or an adaptive pool).
        self.stride: int | None = None
        if src is None or tgt is None:
            if not (source.layout == target.layout == "NLC"
                    and abs(target.shape[0] - source.shape[0]) <= _MAX_LEADING_TOKENS):
                raise ValueError(
                    f"cannot project block {source.name!r}'s output {source.shape} ({source.layout}) to the "
                    f"input {target.shape} ({target.layout}) of a copy of the block after {target.name!r}: a "
                    "token sequence that is no square grid after a few class tokens cannot be resampled")
            self.length_change = target.shape[0] - source.shape[0]
            fresh = self.length_change
        else:
            (self.source_leading, self.source_grid), (self.target_leading, self.target_grid) = src, tgt
            fresh = self.target_leading - self.source_leading
            if self.source_grid != self.target_grid:
                (h, w), (th, tw) = self.source_grid, self.target_grid
                if h % th == 0 and w % tw == 0 and h // th == w // tw:
                    self.stride = h // th
        if target.layout == "NCHW":
            self.conv = nn.Conv2d(source.out_chs, target.out_chs, 1, stride=self.stride or 1, bias=False)
            self.norm = nn.BatchNorm2d(target.out_chs)
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.linear = nn.Linear(source.out_chs, target.out_chs)
        if fresh > 0:
            self.tokens = nn.Parameter(torch.zeros(1, fresh, target.out_chs))
            nn.init.trunc_normal_(self.tokens, std=0.02)

    def _with_leading(self, lead: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``x`` behind the target's number of leading tokens (from ``lead``, then fresh ones)."""
        want = self.target_leading
        lead = lead[:, :want]
        if lead.shape[1] < want:
            lead = torch.cat([self.tokens.expand(x.shape[0], -1, -1), lead], dim=1)
        return torch.cat([lead, x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_grid is None or self.target_grid is None:  # channel-wise, length adjusted at the front
            x = self.linear(x)
            if self.length_change > 0:
                return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)
            return x[:, -self.length_change:] if self.length_change < 0 else x
        (h, w), target_grid = self.source_grid, self.target_grid
        lead = x[:, : self.source_leading]
        if self.source_layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif self.source_layout == "NLC":
            x = x[:, self.source_leading:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        if tuple(x.shape[-2:]) != target_grid and self.stride is None:
            x = F.adaptive_avg_pool2d(x, target_grid)
        if self.target_layout == "NCHW":
            return self.norm(self.conv(x))  # (a strided 1x1 conv: the subsampling)
        if self.stride:
            x = x[:, :, :: self.stride, :: self.stride]
        x = self.linear(x.permute(0, 2, 3, 1))
        if self.target_layout == "NHWC":
            return x
        x = x.flatten(1, 2)
        if self.target_leading == 0:
            return x
        lead = self.linear(lead) if self.source_layout == "NLC" else x[:, :0]
        return self._with_leading(lead, x)
