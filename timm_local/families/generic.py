"""The generic family: any timm model no specific family takes (ConvNeXt, MobileNetV3, ResNetV2,
DenseNet, CSPNet, ByobNet, NFNet, ViT, Swin, ...).

Registered for ``nn.Module``, so it is the last class of every model's MRO: the specific families
(the paper's exact ones) keep priority, and a specific family that cannot copy some of its class's
block types hands the model over (``supports``). The cut is :func:`~.graph_cut.cut_forward_features`
(timm's block map + the traced glue of ``forward_features``); copies are shape-keeping deep copies
(:mod:`.copies`). See docs/families.md.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ._registry import FamilyAdapter, UnsupportedModelError, register_family, unsupported_message
from .copies import ShapeProjection, fresh_copy
from .fx_trace import TraceFailure
from .graph_cut import cut_forward_features
from .spec import BlockSpec, PartitionView


@register_family
class GenericFamily(FamilyAdapter):
    """Local blocks from timm's own block structure; copies of any block type, re-initialised."""

    name = "generic"
    model_classes = (nn.Module,)
    copy_rule = "shape"

    def supports(self, model: nn.Module) -> bool:
        """A timm-style model: features and head as separate methods (the partition's blocks and top)."""
        return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))

    def cut(self, model: nn.Module, input_size: Sequence[int]) -> list[tuple[str, nn.Module]]:
        """The cut for ``(C, H, W)`` inputs: values the glue derives from the input's shape alone (a
        rotary table for the token grid) are fixed at that size."""
        try:
            return cut_forward_features(model, input_size)
        except TraceFailure as e:
            raise UnsupportedModelError(unsupported_message(model, f"the generic cut failed: {e}")) from None

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The cut at the model's own input size (``pretrained_cfg``)."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return self.cut(model, cfg.get("input_size", (3, 224, 224)))

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        raise TypeError(
            "generic copies keep their primary block's input shape and are built with "
            "Partition.make_shaped_copy(index, source_spec), not with a width and a stride"
        )

    def make_shaped_copy(self, partition: PartitionView, index: int, source: BlockSpec) -> nn.Module:
        """Block ``index`` re-initialised, behind a projection when ``source`` is not its input shape."""
        expected = partition.specs[index - 1]  # what block ``index`` is fed in the primary network
        block = fresh_copy(partition.blocks[index], partition.model)
        if (source.layout, source.shape) == (expected.layout, expected.shape):
            return block
        return nn.Sequential(ShapeProjection(source, expected), block)
