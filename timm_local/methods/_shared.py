"""Pieces shared by the per-block local baselines (DGL, PredSim, InfoPro, AugLocal + InfoPro).

Everything here derives its choices from the :class:`~timm_local.partition.Partition` (block
channels and output strides) and, where a build-time spatial size is unavoidable (the width of
a linear layer after pooling), from the model's input size: never from hard-coded CIFAR
widths, so the baselines run on every family the partition supports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..partition import BlockSpec, Partition, init_like_primary
from .base import LocalHead, LocalStage


# --------------------------------------------------------------------------- partition helpers
def model_input_size(partition: Partition) -> tuple[int, int, int]:
    """(C, H, W) the partition was built (and its block specs measured) for."""
    c, h, w = partition.input_size
    return int(c), int(h), int(w)


def block_feature_size(partition: Partition, index: int) -> tuple[int, int]:
    """Expected (H, W) of block ``index``'s output at the model's input size."""
    _, h, w = model_input_size(partition)
    r = partition.specs[index].reduction
    return max(1, math.ceil(h / r)), max(1, math.ceil(w / r))


def next_downsampling(specs: Sequence[BlockSpec], index: int) -> BlockSpec | None:
    """The first later block that reduces the spatial size (the start of the next stage), if any."""
    reduction = specs[index].reduction
    for spec in specs[index + 1 :]:
        if spec.reduction > reduction:
            return spec
    return None


#: The methods whose auxiliary networks work on token outputs (MAN++ on models whose blocks all output tokens).
LAYOUT_FREE_METHODS = ("auglocal", "bp", "checkpoint", "man_pp")


def require_feature_maps(partition: Partition, blocks: Sequence[int], method: str) -> None:
    """Refuse token outputs: DGL / PredSim / InfoPro heads are convolutions over a (C, H, W) map.

    Channels-last maps are fine (the heads see them permuted, :class:`ChannelsFirst`); a token
    sequence (B, N, C) with class tokens has no grid to convolve, so the method is refused with
    the methods that do work on the model.
    """
    for index in blocks:
        spec = partition.specs[index]
        if spec.layout == "NLC":
            raise ValueError(
                f"method {method!r} needs (B, C, H, W) feature maps, but local block {spec.name!r} of "
                f"{type(partition.model).__name__} outputs tokens of shape (B, {spec.shape[0]}, {spec.shape[1]}); "
                f"on this model use one of {', '.join(LAYOUT_FREE_METHODS)}"
            )


class ChannelsFirst(LocalHead):
    """A feature-map head on a channels-last (B, H, W, C) block output: permutes, then delegates."""

    def __init__(self, head: LocalHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.permute(0, 3, 1, 2))

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.local_loss(features.permute(0, 3, 1, 2), target, inputs)

    def after_backward(self) -> None:
        self.head.after_backward()


def per_block_stages(
    partition: Partition, make_head: Callable[[int], LocalHead], method: str = "this method"
) -> list[LocalStage]:
    """A head on every block but the last; the last block and the network's top form the final stage.

    This is the partition of DGL, PredSim and InfoPro in docs/spec.md §3 (InfoPro on ResNet-32:
    K = 16 local modules, heads on modules 0..K-2).
    """
    return module_stages(partition, range(len(partition)), lambda index, k: make_head(index), method)


def module_stages(
    partition: Partition, ends: Sequence[int], make_head: Callable[[int, int], LocalHead], method: str = "this method",
    channels_first: bool = True, feature_maps: bool = True,
) -> list[LocalStage]:
    """One stage per local module (``ends``: each module's last block), a head on every module but the last.

    ``make_head(index, k)`` builds module ``k``'s head on the output of its last block ``index``; the last
    module and the network's top form the final stage. ``channels_first``: heads on channels-last maps see
    them permuted (:class:`ChannelsFirst`); False for heads that feed the map to copies of later blocks.
    ``feature_maps``: the heads need (C, H, W) maps, so token outputs are refused; False for token heads.
    """
    n = len(partition)
    if n < 2:
        raise ValueError(
            f"a per-block local method needs at least 2 local blocks, but the partition of "
            f"{type(partition.model).__name__} has {n}; use method='bp' for this model"
        )
    if feature_maps:
        require_feature_maps(partition, ends[:-1], method)
    stages, start = [], 0
    for k, index in enumerate(ends[:-1]):
        head = make_head(index, k)
        init_like_primary(head)
        if channels_first and partition.specs[index].layout == "NHWC":
            head = ChannelsFirst(head)
        stages.append(LocalStage(list(range(start, index + 1)), head))
        start = index + 1
    stages.append(LocalStage(list(range(start, n))))
    return stages


def parameter_pairs(copy: nn.Module, primary: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(copy's parameter, primary's parameter) in module order, as MAN's official ``zip`` pairs them."""
    pairs = list(zip(copy.parameters(), primary.parameters()))
    if len(pairs) != len(list(primary.parameters())) or len(pairs) != len(list(copy.parameters())) or any(
            a.shape != b.shape for a, b in pairs):
        raise ValueError(f"the momentum copy of {type(primary).__name__} does not have its parameters; MAN needs "
                         "copies of the next block with the block's own input shape")
    return pairs


# --------------------------------------------------------------------------- InfoPro loss weights
@dataclass(frozen=True)
class LossWeights:
    """InfoPro's λx (reconstruction) and λy (classification) at the first and the last head.

    Head k of K-1 heads (k = 0..K-2) uses the linear interpolation at ratio k / (K-2), as in
    the InfoPro / AugLocal reference code (ratio 0 when there is a single head).
    """

    x_start: float
    x_end: float
    y_start: float
    y_end: float

    def at(self, k: int, num_heads: int) -> tuple[float, float]:
        """(λx, λy) of head ``k`` among ``num_heads`` heads."""
        ratio = k / (num_heads - 1) if num_heads > 1 else 0.0
        return (
            self.x_start * (1 - ratio) + self.x_end * ratio,
            self.y_start * (1 - ratio) + self.y_end * ratio,
        )


#: The paper's settings (docs/spec.md §3), with the number of local blocks they were tuned for.
INFOPRO_PRESETS: dict[str, tuple[int, LossWeights]] = {
    "resnet32": (16, LossWeights(x_start=5.0, x_end=0.2, y_start=0.05, y_end=0.5)),
    "resnet110": (55, LossWeights(x_start=5.0, x_end=0.5, y_start=0.0, y_end=1.0)),
}


def resolve_loss_weights(
    preset: str,
    num_blocks: int,
    lambda_x: Sequence[float] | None = None,
    lambda_y: Sequence[float] | None = None,
) -> tuple[str, LossWeights]:
    """The InfoPro weight schedule for a partition of ``num_blocks`` blocks.

    ``preset="auto"`` takes the paper preset tuned for the nearest number of local blocks
    (ResNet-32: 16, ResNet-110: 55; a tie goes to ResNet-32, the milder schedule). So
    ResNet-20/56 and ImageNet ResNets use the ResNet-32 schedule, very deep nets the
    ResNet-110 one. ``lambda_x`` / ``lambda_y`` = (first, last) override the preset's values.
    """
    if preset == "auto":
        preset = min(INFOPRO_PRESETS, key=lambda p: (abs(INFOPRO_PRESETS[p][0] - num_blocks), INFOPRO_PRESETS[p][0]))
    if preset not in INFOPRO_PRESETS:
        raise ValueError(
            f"unknown InfoPro loss-weight preset {preset!r}; use 'auto', "
            f"{', '.join(repr(p) for p in INFOPRO_PRESETS)}, or give lambda_x=(first, last) and "
            "lambda_y=(first, last)"
        )
    weights = INFOPRO_PRESETS[preset][1]
    for name, pair in (("lambda_x", lambda_x), ("lambda_y", lambda_y)):
        if pair is not None and (len(pair) != 2 or any(float(v) < 0 for v in pair)):
            raise ValueError(f"{name} must be (first head, last head) with non-negative values, got {pair!r}")
    if lambda_x is not None:
        weights = LossWeights(float(lambda_x[0]), float(lambda_x[1]), weights.y_start, weights.y_end)
    if lambda_y is not None:
        weights = LossWeights(weights.x_start, weights.x_end, float(lambda_y[0]), float(lambda_y[1]))
    return preset, weights


# --------------------------------------------------------------------------- InfoPro decoder
def dataset_stats(
    partition: Partition, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std of the training data: given, else the backbone's pretrained_cfg.

    InfoPro reconstructs the *image*, so its target is the network input with the data
    pipeline's normalisation undone; the pipeline normalises with these statistics.
    """
    cfg = getattr(partition.model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (mean if mean is not None else cfg.get("mean", ())))
    std = tuple(float(v) for v in (std if std is not None else cfg.get("std", ())))
    if not mean or not std:
        raise ValueError(
            f"{type(partition.model).__name__} has no pretrained_cfg mean/std, which InfoPro needs to "
            "de-normalise its reconstruction target; pass method_kwargs=dict(mean=(...), std=(...))"
        )
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"mean {mean} and std {std} must have one value per channel and std > 0")
    return mean, std


class InfoProDecoder(nn.Module):
    """Bilinear upsample to the input size → 3×3 conv C→12 + BN + ReLU → 3×3 conv 12→3.

    Returns logits; the sigmoid of the reference code is folded into the loss
    (``binary_cross_entropy_with_logits`` = sigmoid + BCE, numerically stable).
    """

    def __init__(
        self, in_chs: int, mean: Sequence[float], std: Sequence[float], hidden_chs: int = 12,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last  # features arrive (B, H, W, C): permute them first
        out_chs = len(mean)
        self.decoder = nn.Sequential(
            nn.Conv2d(in_chs, hidden_chs, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_chs, out_chs, kernel_size=3, padding=1),
        )
        # Not persistent: statistics of the data pipeline, not learned state.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def target(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input image de-normalised to [0, 1] (clamped: a no-op up to rounding on real images)."""
        if inputs.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"InfoPro decoder expects {self.mean.shape[1]}-channel inputs (from mean/std), got "
                f"{inputs.shape[1]}; pass matching mean/std in method_kwargs"
            )
        return (inputs * self.std + self.mean).clamp(0.0, 1.0)

    def forward(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits at the input's spatial size."""
        if self.channels_last:
            features = features.permute(0, 3, 1, 2)
        x = F.interpolate(features, size=inputs.shape[-2:], mode="bilinear", align_corners=True)
        return self.decoder(x)

    def loss(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the reconstruction against the de-normalised input."""
        return F.binary_cross_entropy_with_logits(self(features, inputs), self.target(inputs))
