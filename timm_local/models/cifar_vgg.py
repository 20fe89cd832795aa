"""VGG19 with BatchNorm for 32x32 inputs (the paper's CIFAR VGG19).

Each 3x3 conv-BN-ReLU (with the max-pool that follows it, where VGG has one) is one
``VggConvBlock``, so the local blocks of this model are its 16 conv layers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._cfg import cifar_cfg

VGG19_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


class VggConvBlock(nn.Module):
    """3x3 conv -> BN -> ReLU, optionally followed by a 2x2 max-pool.

    ``stride`` exists for auxiliary copies: AugLocal downsamples an auxiliary layer by its
    stride (AUGLOCAL.md §2.5) rather than by a pool.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class CifarVgg(nn.Module):
    """VGG with BN and a single linear classifier on the 1x1x512 feature map."""

    def __init__(
        self,
        layout: tuple[int | str, ...] = VGG19_LAYOUT,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans  # read by timm's export (save_for_hf) and data config
        self.drop_rate = drop_rate
        self.feature_info = []
        blocks: list[nn.Module] = []
        in_chs, reduction = in_chans, 1
        for i, item in enumerate(layout):
            if item == "M":
                continue
            pool = i + 1 < len(layout) and layout[i + 1] == "M"
            blocks.append(VggConvBlock(in_chs, int(item), pool=pool))
            in_chs = int(item)
            if pool:
                reduction *= 2
                self.feature_info.append(
                    dict(num_chs=in_chs, reduction=reduction, module=f"blocks.{len(blocks) - 1}")
                )
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {"vgg19_cifar": cifar_cfg(first_conv="blocks.0.conv", pool_size=(1, 1))}
)


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVgg:
    """VGG19-BN for CIFAR (20.0 M parameters)."""
    return build_model_with_cfg(
        CifarVgg, "vgg19_cifar", pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs
    )
