"""CIFAR ResNets of He et al. (2016): ResNet-20/32/56/110.

A 3x3 stem with 16 channels and three stages (16/32/64 channels, strides 1/2/2) of timm's own
``BasicBlock``; a 1x1-conv + BN projection shortcut where the shape changes (option B, as in
the InfoPro/AugLocal reference code). Reusing timm's block means the ResNet family adapter
builds auxiliary copies of these blocks exactly as it does for ImageNet ResNets.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, downsample_conv

from ._cfg import cifar_cfg


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with the timm model interface (forward_features/forward_head)."""

    def __init__(
        self,
        depth: int = 110,
        num_classes: int = 10,
        in_chans: int = 3,
        channels: tuple[int, int, int] = (16, 32, 64),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_chans = in_chans  # read by timm's export (save_for_hf) and data config
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="act1")]

        in_chs = channels[0]
        reduction = 1
        for stage_idx, out_chs in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                s = stride if block_idx == 0 else 1
                downsample = None
                if s != 1 or in_chs != out_chs:
                    downsample = downsample_conv(in_chs, out_chs, kernel_size=1, stride=s)
                blocks.append(BasicBlock(in_chs, out_chs, stride=s, downsample=downsample))
                in_chs = out_chs
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(
                dict(num_chs=out_chs, reduction=reduction, module=f"layer{stage_idx + 1}")
            )

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """He-normal convs, BN (1, 0): the initialisation of the reference CIFAR code."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, depth: int, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        depth=depth,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {f"resnet{d}_cifar": cifar_cfg() for d in (20, 32, 56, 110)}
)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters)."""
    return _create_cifar_resnet("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46 M parameters)."""
    return _create_cifar_resnet("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85 M parameters)."""
    return _create_cifar_resnet("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (1.7 M parameters)."""
    return _create_cifar_resnet("resnet110_cifar", 110, pretrained, **kwargs)
