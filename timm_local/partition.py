"""Cutting a timm model into its local blocks.

A :class:`Partition` is the single source of truth for "what the local blocks are": the
ordered blocks (stem first), each block's output channels and output stride, and the top
(the network's own pooling + classifier). It is built by the model's *family adapter*
(:mod:`timm_local.families`), and verified once against ``model.forward_features`` so a wrong
cut can never train silently.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .families import FamilyAdapter, adapter_for
from .families.spec import LAYOUTS, BlockSpec, run_on_probe

__all__ = ["LAYOUTS", "BlockSpec", "Partition", "init_like_primary", "partition", "run_on_probe"]


class Partition:
    """Ordered local blocks of an unchanged timm model, plus its top.

    The blocks are the model's own modules (no copies), so training a partition trains the
    model; the partition itself holds no parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        names: Sequence[str],
        blocks: Sequence[nn.Module],
        specs: Sequence[BlockSpec],
        input_size: Sequence[int],
    ) -> None:
        self.model = model
        self.input_size = tuple(input_size)  # (C, H, W) the specs were measured at
        self.adapter = adapter
        self.names = list(names)
        self.blocks = list(blocks)
        self.specs = list(specs)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"Partition(family={self.adapter.name!r}, blocks={len(self)})"

    def top(self, features: torch.Tensor) -> torch.Tensor:
        """The network's own pooling and classifier."""
        return self.model.forward_head(features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @property
    def copies_keep_shape(self) -> bool:
        """True when AugLocal's copies are shape-keeping deep copies (:meth:`make_shaped_copy`)."""
        return self.adapter.copy_rule == "shape"

    def make_shaped_copy(self, index: int, source: BlockSpec) -> nn.Module:
        """A freshly initialised copy of block ``index`` that takes features shaped like ``source``'s output.

        For adapters whose copies keep the primary block's own input shape (the generic family): a
        projection in front maps ``source``'s shape to block ``index``'s input shape when they differ.
        """
        if not 0 < index < len(self):
            raise IndexError(f"block index {index} out of range 1..{len(self) - 1} (block 0 is the stem)")
        return self.adapter.make_shaped_copy(self, index, source)

    def make_block_like(self, index: int, in_chs: int, stride: int) -> nn.Module:
        """A freshly initialised block with the architecture of block ``index``.

        It maps ``in_chs`` channels to block ``index``'s output channels with the given stride;
        this is how AugLocal copies the architecture (never the weights) of later blocks.
        """
        if not 0 < index < len(self):
            raise IndexError(f"block index {index} out of range 1..{len(self) - 1} (block 0 is the stem)")
        block = self.adapter.make_block_like(
            self.model, self.blocks[index], in_chs, self.specs[index].out_chs, stride
        )
        init_like_primary(block)
        return block


def init_like_primary(module: nn.Module) -> None:
    """He-normal convs, BN weight 1 / bias 0 (docs/spec.md §2.6)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _measure_block(
    index: int, name: str, h: object, x: torch.Tensor, model: nn.Module, previous: str | None
) -> BlockSpec:
    """The :class:`BlockSpec` of a block output ``h`` measured on the probe image ``x``.

    A 4-d output is NCHW or NHWC: the two dimensions that follow the image's aspect ratio are the
    spatial ones. When both readings fit (channels equal to the map size) the previous block's
    layout decides, then the model's declared ``output_fmt``, then NCHW.
    """
    if not isinstance(h, torch.Tensor):
        raise NotImplementedError(
            f"local block {name!r} of {type(model).__name__} returned a {type(h).__name__}; local blocks must "
            "pass one tensor to the next")
    height, width = x.shape[-2:]
    if h.ndim == 3:
        layout, chs, tokens = "NLC", int(h.shape[2]), int(h.shape[1])
        patches = tokens - int(getattr(model, "num_prefix_tokens", 0) or 0)  # class / register tokens
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            tokens = patches
        reduction = max(1, round(math.sqrt(height * width / max(1, tokens))))
        return BlockSpec(index, name, chs, reduction, layout, tuple(int(d) for d in h.shape[1:]))
    if h.ndim != 4:
        raise NotImplementedError(
            f"local block {name!r} of {type(model).__name__} returned shape {tuple(h.shape)}; supported block "
            "outputs are (B, C, H, W), (B, H, W, C) and tokens (B, N, C)")
    nchw, nhwc = _is_map(h.shape[2], h.shape[3], height, width), _is_map(h.shape[1], h.shape[2], height, width)
    if nchw != nhwc:
        layout = "NCHW" if nchw else "NHWC"
    elif previous in ("NCHW", "NHWC"):
        layout = previous
    else:
        layout = "NHWC" if "NHWC" in str(getattr(model, "output_fmt", "")) else "NCHW"
    if layout == "NCHW":  # (reduction from the width, as it always was measured)
        chs, reduction = int(h.shape[1]), max(1, round(x.shape[-1] / h.shape[-1]))
    else:
        chs, reduction = int(h.shape[3]), max(1, round(x.shape[-1] / h.shape[2]))
    return BlockSpec(index, name, chs, reduction, layout, tuple(int(d) for d in h.shape[1:]))


def _is_map(h: int, w: int, height: int, width: int) -> bool:
    """Whether (h, w) can be the spatial size of a feature map of an (height, width) image: the
    image's aspect ratio, up to one position of rounding."""
    if not (0 < h <= height and 0 < w <= width):
        return False
    return abs(h * width - w * height) <= max(height, width)


def _probe_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    param = next(model.parameters())
    return torch.randn(1, *input_size, device=param.device, dtype=param.dtype)


def partition(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    verify: bool = True,
) -> Partition:
    """Cut ``model`` into local blocks with its family adapter.

    One probe forward (eval mode, no grad, at ``input_size`` or the model's pretrained_cfg
    size) measures each block's channels and output stride and checks that running the blocks
    in order reproduces ``model.forward_features`` exactly.
    """
    adapter = adapter_for(model)
    x = _probe_input(model, input_size)
    named_blocks = adapter.cut(model, tuple(x.shape[1:]))
    names = [n for n, _ in named_blocks]
    blocks = [b for _, b in named_blocks]

    was_training = model.training
    model.eval()
    specs: list[BlockSpec] = []
    try:
        with torch.no_grad():
            h = x
            for i, (name, block) in enumerate(named_blocks):
                h = run_on_probe(model, x, f"local block {name!r}", block, h)
                specs.append(_measure_block(i, name, h, x, model, specs[-1].layout if specs else None))
            if verify:
                expected = run_on_probe(model, x, "forward_features", model.forward_features, x)
                if not isinstance(expected, torch.Tensor):
                    raise NotImplementedError(
                        f"{type(model).__name__}.forward_features returns a {type(expected).__name__}, not one "
                        "tensor; timm_local trains models whose features are a single tensor")
                # (an untrained model in eval mode may overflow: NaN where forward_features has NaN is equal)
                if expected.shape != h.shape or not torch.allclose(h, expected, rtol=1e-4, atol=1e-5, equal_nan=True):
                    raise RuntimeError(
                        f"the {adapter.name!r} family adapter's cut of {type(model).__name__} does not "
                        "reproduce model.forward_features (max abs diff "
                        f"{(h - expected).abs().max().item() if h.shape == expected.shape else 'n/a: shapes differ'}); "
                        "the adapter's local_blocks() must list every module forward_features runs, in order"
                    )
    finally:
        model.train(was_training)
    return Partition(model, adapter, names, blocks, specs, tuple(x.shape[1:]))
