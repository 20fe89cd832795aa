"""InfoPro (Wang et al., ICLR 2021), as docs/spec.md §3.

Each local module k = 0..K-2 (all but the last; by default each block is a module) gets two networks on
the output of its last block:

* a classifier: 3×3 conv (to the next stage's width at stride 2 while a later stage still
  downsamples, else C→C at stride 1) + BN + ReLU → global average pool → Linear 128 → ReLU →
  Linear to the classes (cross-entropy);
* a decoder that reconstructs the input image (:class:`~._shared.InfoProDecoder`; binary
  cross-entropy against the de-normalised input in [0, 1]).

Loss = λx·BCE + λy·CE, with λx and λy interpolated linearly over k (ratio k/(K-2)) between
the endpoints of a preset (``weights``): the paper's ResNet-32 or ResNet-110 values, or the
nearest one by number of blocks ("auto"); ``lambda_x`` / ``lambda_y`` override them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..partition import Partition
from ._shared import (
    INFOPRO_PRESETS,
    InfoProDecoder,
    LossWeights,
    dataset_stats,
    module_stages,
    next_downsampling,
    resolve_loss_weights,
)
from .base import LocalHead, LocalMethod, LocalStage, classification_loss, register_method
from .modules import LocalModules


class InfoProClassifier(nn.Sequential):
    """3×3 conv (stride s) + BN + ReLU → GAP → Linear ``hidden`` → ReLU → Linear classes."""

    def __init__(self, in_chs: int, conv_chs: int, stride: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__(
            nn.Conv2d(in_chs, conv_chs, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(conv_chs),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(conv_chs, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )


class ReconstructionHead(LocalHead):
    """A classifier (``forward``: the counted auxiliary network) plus InfoPro's decoder.

    ``local_loss`` = λx·BCE(reconstruction) + λy·CE(classifier). Shared by InfoPro (with its
    own classifier) and AugLocal + InfoPro (with AugLocal's auxiliary network).
    """

    def __init__(self, classifier: nn.Module, decoder: InfoProDecoder, lambda_x: float, lambda_y: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.decoder = decoder
        self.lambda_x = float(lambda_x)
        self.lambda_y = float(lambda_y)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(features)
        loss = self.lambda_x * self.decoder.loss(features, inputs) + self.lambda_y * classification_loss(logits, target)
        return loss, logits

    def extra_repr(self) -> str:
        return f"lambda_x={self.lambda_x:.4g}, lambda_y={self.lambda_y:.4g}"


class ReconstructionWeights:
    """Hyper-parameters shared by the InfoPro-style methods (loss weights, data statistics)."""

    def _init_weights(
        self,
        weights: str,
        lambda_x: Sequence[float] | None,
        lambda_y: Sequence[float] | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        if weights != "auto" and weights not in INFOPRO_PRESETS:
            raise ValueError(
                f"weights must be 'auto' or one of {sorted(INFOPRO_PRESETS)} (the paper's InfoPro "
                f"loss-weight schedules), got {weights!r}"
            )
        resolve_loss_weights(weights if weights != "auto" else "resnet32", 1, lambda_x, lambda_y)  # validate now
        self.weights = weights
        self.lambda_x = None if lambda_x is None else tuple(float(v) for v in lambda_x)
        self.lambda_y = None if lambda_y is None else tuple(float(v) for v in lambda_y)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.resolved: tuple[str, LossWeights] | None = None
        self.stats_used: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _weights_config(self) -> dict[str, Any]:
        # the statistics actually used (given, else the backbone's pretrained_cfg once built): the
        # reconstruction target depends on them, so a resumed run must use the same
        mean, std = self.stats_used or (self.mean, self.std)
        return {
            "weights": self.weights,
            "lambda_x": self.lambda_x,
            "lambda_y": self.lambda_y,
            "mean": mean,
            "std": std,
        }

    def _resolve(self, partition: Partition) -> tuple[LossWeights, tuple[float, ...], tuple[float, ...]]:
        self.resolved = resolve_loss_weights(self.weights, len(partition), self.lambda_x, self.lambda_y)
        mean, std = dataset_stats(partition, self.mean, self.std)
        self.stats_used = (mean, std)
        return self.resolved[1], mean, std


def classifier_width(hidden: int) -> int:
    """The hidden width of InfoPro's classifier, checked (shared by the methods built on InfoPro's heads)."""
    if int(hidden) < 1:
        raise ValueError(f"hidden (classifier width) must be a positive integer, got {hidden!r}")
    return int(hidden)


def infopro_conv(partition: Partition, index: int) -> tuple[int, int]:
    """(out channels, stride) of InfoPro's classifier conv on block ``index``.

    While a later stage still downsamples, the conv mimics the next stage's transition: its
    width at stride 2 (CIFAR ResNets: 16→32, 32→64). In the last stage: C→C at stride 1.
    """
    nxt = next_downsampling(partition.specs, index)
    if nxt is None:
        return partition.specs[index].out_chs, 1
    return nxt.out_chs, 2


@register_method("infopro")
class InfoPro(LocalModules, ReconstructionWeights, LocalMethod):
    """Information propagation: classification + image reconstruction on every block but the last.

    ``weights``: "auto" (default; the paper preset for the nearest number of blocks),
    "resnet32" (λx 5→0.2, λy 0.05→0.5) or "resnet110" (λx 5→0.5, λy 0→1). ``lambda_x`` /
    ``lambda_y`` = (first head, last head) override the preset. ``mean`` / ``std`` default to
    the backbone's pretrained_cfg (the data pipeline's normalisation). ``hidden`` is the
    classifier's hidden width (128).
    """

    def __init__(
        self,
        weights: str = "auto",
        lambda_x: Sequence[float] | None = None,
        lambda_y: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 128,
        local_modules: int | None = None,
        local_module_ends: Sequence[int] | None = None,
    ) -> None:
        self._init_weights(weights, lambda_x, lambda_y, mean, std)
        self._init_modules(local_modules, local_module_ends)
        self.hidden = classifier_width(hidden)

    def config(self) -> dict[str, Any]:
        return {**self._weights_config(), "hidden": self.hidden, **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        weights, mean, std = self._resolve(partition)
        ends = self.module_ends(partition)

        def make_head(index: int, k: int) -> ReconstructionHead:
            chs = partition.specs[index].out_chs
            conv_chs, stride = infopro_conv(partition, index)
            lambda_x, lambda_y = weights.at(k, len(ends) - 1)
            return ReconstructionHead(
                InfoProClassifier(chs, conv_chs, stride, num_classes, self.hidden),
                InfoProDecoder(chs, mean, std),
                lambda_x,
                lambda_y,
            )

        return module_stages(partition, ends, make_head, self.name)
