"""HPFF, Hierarchical locally supervised learning with Patch Feature Fusion (ECCV 2024), as its official
CIFAR code does it (Zeudfish/HPFF, ``network/resnetInfoPro_HPFF.py`` and ``network/auxiliary_net.py``).

With K local modules M_0..M_{K-1}, every step runs two paths:

* **independent**: module i on its own detached input; module i's head has a classifier on its
  output (cross-entropy, weight ``w_own`` = 0.001);
* **cascade** (the engine's :attr:`~timm_local.methods.base.LocalStage.cascade`): M_{i-1} and M_i run
  again from M_{i-1}'s detached input, so this loss (weight ``w_cascade`` = 0.999) trains both and no
  module further back: λx·(patch decoder BCE) + λy·CE of a second classifier, InfoPro's λ schedule at
  ratio i/(K−2).

M_0 has no loss of its own (it is trained by M_1's cascade); the last module's loss is
w_own·CE(top(M_{K-1}(x))) + w_cascade·CE(top(M_{K-1}(M_{K-2}(·)))). The patch decoder splits the
feature map into 2×2 quadrants, each reconstructing its quadrant of the image with its own
InfoPro decoder (sum of the four BCEs).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..partition import Partition, init_like_primary
from ._shared import InfoProDecoder, require_feature_maps
from .base import LocalHead, LocalMethod, LocalStage, classification_loss, register_method
from .infopro import InfoProClassifier, ReconstructionWeights, classifier_width, infopro_conv
from .modules import LocalModules


def _halves(n: int) -> tuple[slice, slice]:
    # a map of size 1 has no halves: both quadrants along that side see the whole of it
    return (slice(0, n // 2), slice(n // 2, n)) if n >= 2 else (slice(0, n), slice(0, n))


def quadrants(t: torch.Tensor) -> list[torch.Tensor]:
    """The 2×2 spatial quadrants of an NCHW tensor (top-left, top-right, bottom-left, bottom-right), split at
    ⌊size/2⌋ as the official decoder does; along a side of size 1 both quadrants take all of it."""
    rows, cols = _halves(t.shape[-2]), _halves(t.shape[-1])
    return [t[..., r, c] for r in rows for c in cols]


class PatchDecoder(nn.Module):
    """Four InfoPro decoders, quadrant i of the features reconstructing quadrant i of the image."""

    def __init__(self, in_chs: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.decoders = nn.ModuleList([InfoProDecoder(in_chs, mean, std) for _ in range(4)])

    def loss(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Sum of the four quadrants' BCE (each decoder upsamples to its image quadrant's size)."""
        return sum(decoder.loss(f, x) for decoder, f, x in zip(self.decoders, quadrants(features), quadrants(inputs)))


class PatchFusionHead(LocalHead):
    """``forward``: the independent path's classifier; ``cascade_loss``: patch decoder + a second classifier."""

    def __init__(self, classifier: nn.Module, cascade_classifier: nn.Module, decoder: PatchDecoder,
                 lambda_x: float, lambda_y: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.cascade_classifier = cascade_classifier
        self.decoder = decoder
        self.lambda_x, self.lambda_y = float(lambda_x), float(lambda_y)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(features)
        return classification_loss(logits, target), logits

    def cascade_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.cascade_classifier(features)
        loss = self.lambda_x * self.decoder.loss(features, inputs) + self.lambda_y * classification_loss(logits, target)
        return loss, logits

    def extra_repr(self) -> str:
        return f"lambda_x={self.lambda_x:.4g}, lambda_y={self.lambda_y:.4g}"


@register_method("hpff")
class HPFF(LocalModules, ReconstructionWeights, LocalMethod):
    """Independent + cascade paths on K local modules (``w_own`` 0.001, ``w_cascade`` 0.999, the official
    model's ``wx`` / ``wy``). InfoPro's ``weights`` / ``lambda_x`` / ``lambda_y`` / ``mean`` / ``std`` /
    ``hidden`` for the cascade path's reconstruction and classifier."""

    def __init__(
        self,
        w_own: float = 0.001,
        w_cascade: float = 0.999,
        weights: str = "auto",
        lambda_x: Sequence[float] | None = None,
        lambda_y: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 128,
        local_modules: int | None = None,
        local_module_ends: Sequence[int] | None = None,
    ) -> None:
        if float(w_own) < 0 or float(w_cascade) < 0:
            raise ValueError(f"w_own and w_cascade must be >= 0, got {w_own!r}, {w_cascade!r}")
        self._init_weights(weights, lambda_x, lambda_y, mean, std)
        self._init_modules(local_modules, local_module_ends)
        self.w_own, self.w_cascade, self.hidden = float(w_own), float(w_cascade), classifier_width(hidden)

    def config(self) -> dict[str, Any]:
        return {"w_own": self.w_own, "w_cascade": self.w_cascade, **self._weights_config(), "hidden": self.hidden,
                **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        weights, mean, std = self._resolve(partition)
        ends = self.module_ends(partition)
        if len(ends) < 3:
            raise ValueError(f"hpff needs at least 3 local modules (its first module learns from the second's "
                             f"cascade, the last from the network's loss), got {len(ends)}")
        require_feature_maps(partition, ends[1:-1], self.name)
        if any(partition.specs[e].layout != "NCHW" for e in ends[1:-1]):
            raise ValueError(f"method {self.name!r} splits (B, C, H, W) feature maps into patches; "
                             f"{type(partition.model).__name__} outputs channels-last maps: use infopro or auglocal")
        starts = [0] + [e + 1 for e in ends[:-1]]
        cascade = (self.w_own, self.w_cascade)
        stages = [LocalStage(list(range(starts[0], ends[0] + 1)), has_loss=False)]
        for k in range(1, len(ends) - 1):
            head = self.make_head(partition, ends[k], k, len(ends) - 1, weights, mean, std, num_classes)
            stages.append(LocalStage(list(range(starts[k], ends[k] + 1)), head, cascade=cascade))
        stages.append(LocalStage(list(range(starts[-1], len(partition))), cascade=cascade))
        return stages

    def make_head(self, partition: Partition, index: int, k: int, num_heads: int, weights: Any,
                  mean: Sequence[float], std: Sequence[float], num_classes: int) -> PatchFusionHead:
        chs = partition.specs[index].out_chs
        conv_chs, stride = infopro_conv(partition, index)
        lambda_x, lambda_y = weights.at(k, num_heads)  # ratio k / (K - 2), the official i / (K - 2)
        head = PatchFusionHead(InfoProClassifier(chs, conv_chs, stride, num_classes, self.hidden),
                               InfoProClassifier(chs, conv_chs, stride, num_classes, self.hidden),
                               PatchDecoder(chs, mean, std), lambda_x, lambda_y)
        init_like_primary(head)
        return head
