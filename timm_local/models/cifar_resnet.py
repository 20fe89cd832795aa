"""CIFAR ResNets of He et al. (2016): ResNet-20/32/56/110.

A 3x3 stem with 16 channels and three stages (16/32/64 channels, strides 1/2/2) of timm's own
``BasicBlock``; a 1x1-conv + BN projection shortcut where the shape changes (option B, as in
the InfoPro/AugLocal reference code). Reusing timm's block means the ResNet family adapter
builds auxiliary copies of these blocks exactly as it does for ImageNet ResNets.
"""
from typing import Any, List, Tuple

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, downsample_conv

from ._cfg import cifar_cfg
from .contract import CifarTimmModel, build_cifar_model

_STAGE_NAMES = ("layer1", "layer2", "layer3")


class CifarResNet(CifarTimmModel):
    """ResNet for 32x32 inputs with the whole timm model interface.

    ``feature_info`` follows timm's ResNet: index 0 is the stem (``act1``), index i the output
    of ``layer{i}``, so out_indices mean the same stages as for ``resnet18``. The stem runs at
    stride 1 like ``layer1``; ``features_only`` therefore defaults to the three stages
    (out_indices 1, 2, 3: one map per stride), as timm does for its models whose stem shares
    a stride with the first stage (e.g. ``csatv2``).
    """

    def __init__(
        self,
        depth: int = 110,
        num_classes: int = 10,
        in_chans: int = 3,
        channels: Tuple[int, int, int] = (16, 32, 64),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        if len(channels) != len(_STAGE_NAMES):
            raise ValueError(f"channels must give one width per stage ({len(_STAGE_NAMES)}), got {channels}")
        blocks_per_stage = (depth - 2) // 6
        self.in_chans = in_chans  # read by timm's export (save_for_hf) and data config
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="act1")]

        in_chs = channels[0]
        reduction = 1
        for stage_idx, (stage_name, out_chs) in enumerate(zip(_STAGE_NAMES, channels)):
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
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=stage_name))

        self.init_head(in_chs, num_classes, global_pool)
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
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for layer-wise LR decay / freezing: the stem, then stages or blocks."""
        return dict(stem=r"^(?:conv1|bn1)\.", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def feature_segments(self) -> List[List[nn.Module]]:
        stem = nn.Sequential(self.conv1, self.bn1, self.act1)
        return [[stem]] + [list(getattr(self, name)) for name in _STAGE_NAMES]

    @torch.jit.ignore
    def drop_after_feature(self, index: int) -> None:
        for name in _STAGE_NAMES[index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity: checkpoint_seq iterates it

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)


def _create_cifar_resnet(variant: str, depth: int, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_cifar_model(
        CifarResNet,
        variant,
        pretrained,
        feature_names=("stem act1 (stride 1)", "layer1 (stride 1)", "layer2 (stride 2)", "layer3 (stride 4)"),
        default_out_indices=(1, 2, 3),  # the three stages; the stem shares layer1's stride
        depth=depth,
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
