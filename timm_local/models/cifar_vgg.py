"""VGG19 with BatchNorm for 32x32 inputs (the paper's CIFAR VGG19).

Each 3x3 conv-BN-ReLU (with the max-pool that follows it, where VGG has one) is one
``VggConvBlock``, so the local blocks of this model are its 16 conv layers.
"""
from typing import Any, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ._cfg import cifar_cfg
from .contract import CifarTimmModel, build_cifar_model

_VGG19_LAYOUT: Tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


class VggConvBlock(nn.Module):
    """3x3 conv -> BN -> ReLU, optionally followed by a 2x2 max-pool.

    ``stride`` exists for auxiliary copies: AugLocal downsamples an auxiliary layer by its
    stride (docs/spec.md §2.5) rather than by a pool.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


def _layout_feature_taps(layout: Sequence[Union[int, str]]) -> List[Tuple[int, int, int]]:
    """(block index, channels, reduction) of each feature tap of a VGG layout.

    A tap is every block that ends with a max-pool, plus the last block if no pool follows it
    (as timm's VGG adds its final map).
    """
    taps: List[Tuple[int, int, int]] = []
    block, chs, reduction = -1, 0, 1
    for i, item in enumerate(layout):
        if item == "M":
            continue
        block, chs = block + 1, int(item)
        if i + 1 < len(layout) and layout[i + 1] == "M":
            reduction *= 2
            taps.append((block, chs, reduction))
    if not taps or taps[-1][0] != block:
        taps.append((block, chs, reduction))
    return taps


class CifarVgg(CifarTimmModel):
    """VGG with BN and a single linear classifier on the 1x1x512 feature map.

    ``feature_info`` has one entry per max-pool: the output of the block that ends with it
    (strides 2..32). timm's VGG taps *before* each pool instead, but here the pool lives inside
    the block (the local block is conv-BN-ReLU-pool), so the block output is the tap.
    """

    def __init__(
        self,
        layout: Tuple[Union[int, str], ...] = _VGG19_LAYOUT,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans  # read by timm's export (save_for_hf) and data config
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        blocks: List[nn.Module] = []
        in_chs = in_chans
        for i, item in enumerate(layout):
            if item != "M":
                pool = i + 1 < len(layout) and layout[i + 1] == "M"
                blocks.append(VggConvBlock(in_chs, int(item), pool=pool))
                in_chs = int(item)
        taps = _layout_feature_taps(layout)
        self.feature_ends = [block for block, _, _ in taps]  # index in self.blocks of each tap
        self.feature_info = [
            dict(num_chs=chs, reduction=reduction, module=f"blocks.{block}") for block, chs, reduction in taps
        ]
        self.blocks = nn.Sequential(*blocks)
        self.init_head(in_chs, num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups: the first conv block is the stem, every later block its own group."""
        return dict(stem=r"^blocks\.0\.", blocks=r"^blocks\.(\d+)\.")

    @torch.jit.ignore
    def feature_segments(self) -> List[List[nn.Module]]:
        starts = [0] + [end + 1 for end in self.feature_ends[:-1]]
        return [list(self.blocks[start : end + 1]) for start, end in zip(starts, self.feature_ends)]

    @torch.jit.ignore
    def drop_after_feature(self, index: int) -> None:
        self.blocks = self.blocks[: self.feature_ends[index] + 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # every block but the stem (blocks.0), see CifarTimmModel
            return checkpoint_seq(self.blocks[1:], self.blocks[0](x))
        return self.blocks(x)


default_cfgs = generate_default_cfgs(
    {"vgg19_cifar": cifar_cfg(first_conv="blocks.0.conv", pool_size=(1, 1))}
)


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVgg:
    """VGG19-BN for CIFAR (20.0 M parameters)."""
    taps = [f"blocks.{block} (stride {reduction})" for block, _, reduction in _layout_feature_taps(_VGG19_LAYOUT)]
    return build_cifar_model(
        CifarVgg,
        "vgg19_cifar",
        pretrained,
        feature_names=taps,
        default_out_indices=range(len(taps)),  # one map per max-pool
        flatten_sequential=True,
        **kwargs,
    )
