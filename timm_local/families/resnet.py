"""ResNets: timm's ``ResNet`` (BasicBlock/Bottleneck: resnet18/34/50/101...) and our CIFAR ResNets."""
from __future__ import annotations

import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, downsample_avg, downsample_conv

from ..models.cifar_resnet import CifarResNet
from ._registry import FamilyAdapter, register_family


@register_family
class ResNetFamily(FamilyAdapter):
    """Stem (conv1, bn1, act1 and maxpool if present), then every residual block of layer1..layerN."""

    name = "resnet"
    model_classes = (ResNet, CifarResNet)

    def supports(self, model: nn.Module) -> bool:
        """Only ResNets of timm's BasicBlock / Bottleneck; Res2Net, ResNeSt, SK blocks go to the generic family."""
        return all(
            isinstance(block, (BasicBlock, Bottleneck))
            for stage in _stages(model) for block in stage
        )

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        stem = [model.conv1, model.bn1, model.act1]
        if isinstance(getattr(model, "maxpool", None), nn.Module):
            stem.append(model.maxpool)
        blocks: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*stem))]
        for stage, layer in enumerate(_stages(model), start=1):
            for i, block in enumerate(layer):
                blocks.append((f"layer{stage}.{i}", block))
        return blocks

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"resnet adapter can copy BasicBlock/Bottleneck, not {type(block).__name__}")
        block_cls = type(block)
        planes = out_chs // block_cls.expansion
        # Recover the constructor arguments from the primary block's conv shapes (timm keeps
        # no config on the block): width = planes * base_width / 64 * cardinality.
        reduce_first = max(1, block.conv2.out_channels // block.conv1.out_channels)
        if isinstance(block, Bottleneck):
            cardinality = block.conv2.groups
            primary_planes = block.conv3.out_channels // block_cls.expansion
            base_width = round(block.conv2.out_channels / cardinality * 64 / primary_planes)
        else:
            cardinality, base_width = 1, 64
        norm_layer = type(block.bn1)
        downsample = None
        if stride != 1 or in_chs != out_chs:
            # 'd' variants (avg_down) project through avg-pool + 1x1 conv: copy that shortcut kind too
            shortcut = downsample_avg if _uses_avg_down(model) else downsample_conv
            downsample = shortcut(in_chs, out_chs, kernel_size=1, stride=stride, norm_layer=norm_layer)
        se = getattr(block, "se", None)
        return block_cls(
            in_chs,
            planes,
            stride=stride,
            downsample=downsample,
            cardinality=cardinality,
            base_width=base_width,
            reduce_first=reduce_first,
            act_layer=type(block.act1),
            norm_layer=norm_layer,
            attn_layer=type(se) if isinstance(se, nn.Module) else None,
        )


def _uses_avg_down(model: nn.Module) -> bool:
    """True when the model's projection shortcuts are timm's ``downsample_avg`` (pool, conv, norm)."""
    return any(
        isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.downsample, nn.Sequential) and len(m.downsample) == 3
        for m in model.modules()
    )


def _stages(model: nn.Module) -> list[nn.Module]:
    """``layer1``, ``layer2``, ... in order."""
    stages = []
    while hasattr(model, f"layer{len(stages) + 1}"):
        stages.append(getattr(model, f"layer{len(stages) + 1}"))
    return stages
