"""detectron2 backbones over any timm CNN created with ``features_only=True``.

The bottom-up network is timm's own feature extractor, untouched: its channels and strides are
read from timm's ``feature_info``, so a ResNet-34 trained and exported by timm_local (or any
other timm CNN) is used exactly as it was trained. Only what detection needs is added on top:
normalisation choice (FrozenBN / BN / SyncBN / GN), freezing of the early stages, the size
divisibility that FPN's top-down additions require, and detectron2's FPN (P2-P6).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.layers import BatchNormAct2d, GroupNormAct, convert_sync_batchnorm, freeze_batch_norm_2d
from timm.utils.model import freeze as timm_freeze
from torch import nn

from .feature_names import module_in_wrapper, stride_feature_name
from .weights import create_timm_features

__all__ = [
    "NORMS",
    "TimmBackbone",
    "build_timm_backbone",
    "build_timm_fpn_backbone",
    "convert_norm",
    "freeze_through",
]

logger = logging.getLogger(__name__)

NORMS = ("FrozenBN", "BN", "SyncBN", "GN", "")


def _group_count(channels: int, groups: int = 32) -> int:
    """32 groups as in detectron2's GN, fewer when the channel count is not a multiple."""
    return math.gcd(channels, groups)


def _bn_to_gn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (timm's BatchNormAct2d included) by GroupNorm, recursively.

    The affine weights are carried over so a pretrained backbone keeps its per-channel scale;
    the running statistics have no GroupNorm counterpart and are dropped. Hand-written because
    neither timm nor detectron2 converts to GroupNorm (they convert to FrozenBN / SyncBN only).
    """
    if isinstance(module, nn.BatchNorm2d):
        channels = module.num_features
        if isinstance(module, BatchNormAct2d):
            gn: nn.GroupNorm = GroupNormAct(channels, _group_count(channels), eps=module.eps,
                                            affine=module.affine, apply_act=False)
            gn.act, gn.drop = module.act, module.drop  # keep the fused activation as it was
        else:
            gn = nn.GroupNorm(_group_count(channels), channels, eps=module.eps, affine=module.affine)
        if module.affine:
            with torch.no_grad():
                gn.weight.copy_(module.weight)
                gn.bias.copy_(module.bias)
        return gn
    for name, child in module.named_children():
        new = _bn_to_gn(child)
        if new is not child:
            module.add_module(name, new)
    return module


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Convert the BatchNorm layers of a timm model to the requested detection norm.

    ``FrozenBN`` keeps the pretrained statistics fixed (detection batches are small);
    ``BN``/"" keep timm's layers; ``SyncBN`` shares statistics across GPUs; ``GN`` suits
    random initialisation and small batches.
    """
    if norm not in NORMS:
        raise ValueError(f"MODEL.TIMM.NORM={norm!r} is not one of {NORMS}.")
    if norm == "FrozenBN":
        return freeze_batch_norm_2d(module)
    if norm == "SyncBN":
        return convert_sync_batchnorm(module)
    if norm == "GN":
        return _bn_to_gn(module)
    return module


def freeze_through(features: nn.Module, freeze_at: int) -> list[str]:
    """Freeze every module up to and including the one producing ``feature_info[freeze_at-1]``.

    Mirrors detectron2's ``FREEZE_AT`` (ResNet: 1 = stem, 2 = stem + res2): parameters stop
    requiring grad and BatchNorm layers become FrozenBatchNorm2d (timm's ``freeze``). "Up to"
    is registration order, the same assumption timm's feature wrappers make about execution
    order. Returns the names of the frozen top-most modules.
    """
    if freeze_at <= 0:
        return []
    total = len(features.feature_info.info)
    if freeze_at > total:
        raise ValueError(f"MODEL.TIMM.FREEZE_AT={freeze_at} but the model has only {total} feature stages.")
    stage = module_in_wrapper(features, features.feature_info.info[freeze_at - 1]["module"])
    order = [name for name, _ in features.named_modules()]  # pre-order: a subtree is contiguous
    end = max(i for i, n in enumerate(order) if n == stage or n.startswith(stage + "."))

    def subtree_end(i: int) -> int:
        prefix = order[i] + "."
        j = i
        while j + 1 < len(order) and order[j + 1].startswith(prefix):
            j += 1
        return j

    chosen: list[str] = []
    for i, name in enumerate(order[: end + 1]):
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        if subtree_end(i) <= end:
            chosen.append(name)
    timm_freeze(features, chosen)
    return chosen


class TimmBackbone(Backbone):
    """A timm ``features_only`` CNN as a detectron2 ``Backbone``.

    Outputs are named after their stride like detectron2's ResNet (stride 4 -> ``res2``,
    8 -> ``res3``, ...), so detectron2's FPN configs (``IN_FEATURES: [res2..res5]``) apply.
    """

    def __init__(
        self,
        name: str,
        *,
        weights: str | Path | None = None,
        out_indices: Iterable[int] = (1, 2, 3, 4),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        features = create_timm_features(name, weights, out_indices, in_chans=in_chans)
        features = convert_norm(features, norm)
        self.frozen = freeze_through(features, freeze_at)
        self.body = features

        info = features.feature_info
        self._out_features: list[str] = []
        self._out_feature_channels: dict[str, int] = {}
        self._out_feature_strides: dict[str, int] = {}
        for channels, stride in zip(info.channels(), info.reduction()):
            out_name = stride_feature_name(stride)
            if out_name is None:
                raise ValueError(f"timm feature stride {stride} of {name!r} is not a power of two.")
            if out_name in self._out_feature_strides:
                raise ValueError(
                    f"MODEL.TIMM.OUT_INDICES={list(out_indices)} selects two features of stride {stride}; "
                    f"pick one index per stride."
                )
            self._out_features.append(out_name)
            self._out_feature_channels[out_name] = int(channels)
            self._out_feature_strides[out_name] = int(stride)
        fmt = str(getattr(features, "output_fmt", "NCHW"))
        self._channels_last = "NHWC" in fmt

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.body(x)
        if isinstance(outputs, dict):
            outputs = list(outputs.values())
        if self._channels_last:
            outputs = [o.permute(0, 3, 1, 2).contiguous() for o in outputs]
        return dict(zip(self._out_features, outputs))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # timm CNNs round odd sizes up at each stride-2 layer; padding the input to the deepest
        # stride keeps every feature map an exact multiple, which FPN's additions require.
        return max(self._out_feature_strides.values())


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """``MODEL.BACKBONE.NAME: build_timm_backbone``: the timm CNN alone (``MODEL.TIMM`` keys)."""
    t = cfg.MODEL.TIMM
    return TimmBackbone(
        t.NAME,
        weights=t.WEIGHTS or None,
        out_indices=t.OUT_INDICES,
        norm=t.NORM,
        freeze_at=t.FREEZE_AT,
        in_chans=input_shape.channels,
    )


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """``MODEL.BACKBONE.NAME: build_timm_fpn_backbone``: timm CNN + FPN (P2-P6 for a ResNet's res2-res5).

    The same construction as detectron2's ``build_resnet_fpn_backbone`` with the bottom-up
    network swapped for :class:`TimmBackbone`.
    """
    bottom_up = build_timm_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    available = bottom_up.output_shape()
    if not in_features or any(f not in available for f in in_features):
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={in_features} but the backbone's outputs (MODEL.TIMM.OUT_INDICES="
            f"{list(cfg.MODEL.TIMM.OUT_INDICES)}) are {list(available)}; pick IN_FEATURES from those."
        )
    top_block = LastLevelMaxPool()
    # detectron2's default pools "p5"; pool the deepest level there is (CIFAR ResNets end at p2)
    top_block.in_feature = f"p{int(math.log2(available[in_features[-1]].stride))}"
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
