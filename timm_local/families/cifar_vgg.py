"""Our CIFAR VGG19: every conv-BN-ReLU(-pool) is a local block."""
from __future__ import annotations

import torch.nn as nn

from ..models.cifar_vgg import CifarVgg, VggConvBlock
from ._registry import FamilyAdapter, register_family


@register_family
class CifarVggFamily(FamilyAdapter):
    name = "cifar_vgg"
    model_classes = (CifarVgg,)

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        return VggConvBlock(in_chs, out_chs, stride=stride)
