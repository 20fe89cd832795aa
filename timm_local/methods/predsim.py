"""PredSim (Nøkland & Eidnes, ICML 2019), as docs/spec.md §3.

Each block but the last gets two heads on its output: a *prediction* head (average-pool until
the flattened size is at most ``max_features`` = 512, then a linear classifier; cross-entropy)
and a *similarity* head (a 3×3 conv C→C whose output's batch similarity matrix is regressed
onto that of the one-hot labels). Loss = 0.99·sim + 0.01·CE. Only the prediction head is the
auxiliary *classifier* (``forward``, counted in ``gmacs``); the similarity conv runs in
training only (``local_loss``, counted in ``gmacs_train``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..partition import Partition
from ._shared import block_feature_size, module_stages
from .base import LocalHead, LocalMethod, LocalStage, register_method
from .modules import LocalModules


def predsim_pool_size(chs: int, height: int, width: int, max_features: int = 512) -> tuple[int, int]:
    """Pooled (H, W) of the prediction head: Nøkland's kernel-doubling rule.

    Double the pooling kernel alternately along H and W (output size = ⌈size / kernel⌉) until
    C·H'·W' ≤ ``max_features`` or the kernel covers the map.
    """
    ks_h = ks_w = 1
    out_h, out_w = height, width
    while chs * out_h * out_w > max_features and (ks_h < height or ks_w < width):
        if ks_h < height:
            ks_h *= 2
            out_h = math.ceil(height / ks_h)
        if chs * out_h * out_w > max_features and ks_w < width:
            ks_w *= 2
            out_w = math.ceil(width / ks_w)
    return out_h, out_w


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Adjusted cosine similarity of the rows of ``x`` (B×B), as in Nøkland & Eidnes' code.

    A feature map (B, C, H, W) with C > 3 and more than one position is first reduced to the
    per-channel spatial standard deviation (B, C); otherwise it is flattened. Rows are centred
    and L2-normalised; the result is clamped to [-1, 1].
    """
    if x.ndim == 4:
        if x.shape[1] > 3 and x.shape[2] * x.shape[3] > 1:
            x = x.flatten(2).std(dim=2)
        else:
            x = x.flatten(1)
    elif x.ndim != 2:
        raise ValueError(f"similarity_matrix expects (B, C, H, W) or (B, F) features, got shape {tuple(x.shape)}")
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


def similarity_loss(features: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MSE between the features' similarity matrix and the one-hot labels' similarity matrix."""
    onehot = F.one_hot(target, num_classes).to(features.dtype)
    return F.mse_loss(similarity_matrix(features), similarity_matrix(onehot))


class PredSimHead(LocalHead):
    """Prediction head (pool + linear) plus the similarity conv used by the training loss."""

    def __init__(
        self, chs: int, pool_size: tuple[int, int], num_classes: int, sim_weight: float = 0.99
    ) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.num_classes = num_classes
        self.sim_weight = sim_weight
        self.fc = nn.Linear(chs * pool_size[0] * pool_size[1], num_classes)
        self.sim_conv = nn.Conv2d(chs, chs, kernel_size=3, padding=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(features, self.pool_size).flatten(1))

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(features)
        sim = similarity_loss(self.sim_conv(features), target, self.num_classes)
        loss = self.sim_weight * sim + (1.0 - self.sim_weight) * F.cross_entropy(logits, target)
        return loss, logits


@register_method("predsim")
class PredSim(LocalModules, LocalMethod):
    """Prediction + similarity matching on every block but the last.

    ``sim_weight`` is the paper's β (0.99): loss = β·sim + (1-β)·CE. ``max_features`` bounds
    the prediction head's input (512 in AugLocal's comparison).
    """

    labels_only = "its similarity-matching loss compares the similarity of one-hot labels"

    def __init__(self, sim_weight: float = 0.99, max_features: int = 512, local_modules: int | None = None,
                 local_module_ends: Sequence[int] | None = None) -> None:
        self._init_modules(local_modules, local_module_ends)
        if not 0.0 <= float(sim_weight) <= 1.0:
            raise ValueError(f"sim_weight (PredSim's beta) must be in [0, 1], got {sim_weight!r}")
        if int(max_features) < 1:
            raise ValueError(f"max_features must be a positive integer, got {max_features!r}")
        self.sim_weight = float(sim_weight)
        self.max_features = int(max_features)

    def config(self) -> dict[str, Any]:
        return {"sim_weight": self.sim_weight, "max_features": self.max_features, **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        def make_head(index: int, k: int) -> PredSimHead:
            chs = partition.specs[index].out_chs
            pool = predsim_pool_size(chs, *block_feature_size(partition, index), self.max_features)
            return PredSimHead(chs, pool, num_classes, self.sim_weight)

        return module_stages(partition, self.module_ends(partition), make_head, self.name)
