"""DGL, Decoupled Greedy Learning (Belilovsky et al., ICML 2020), as docs/spec.md §3.

Each block but the last gets the auxiliary network of DGL's reference code: average-pool to a
quarter of the spatial size, three 1×1 conv-BN-ReLU layers at the block's width C, pool to
2×2, and an MLP (two Linear 4C→4C + BN1d + ReLU, then a linear classifier); cross-entropy.
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


class DGLHead(LocalHead):
    """AP to ⌈S/4⌉ → n_convs × [1×1 conv C→C, BN, ReLU] → AP to m×m → n_mlp × [Linear, BN1d, ReLU] → Linear.

    The first pool follows the feature map's size at run time. ``mlp_in_size`` m is 2, or
    ⌈S/4⌉ when that is smaller (maps of 4×4 or less, as in the AugLocal reference code); it is
    fixed at build time because it sets the MLP's width (m²·C).
    """

    def __init__(self, chs: int, mlp_in_size: int, num_classes: int, num_convs: int = 3, num_mlp: int = 2) -> None:
        super().__init__()
        self.mlp_in_size = mlp_in_size
        convs: list[nn.Module] = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(chs, chs, kernel_size=1, bias=False), nn.BatchNorm2d(chs), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        features = chs * mlp_in_size * mlp_in_size
        mlp: list[nn.Module] = []
        for _ in range(num_mlp):
            # No bias before BatchNorm1d: it would be cancelled by the normalisation.
            mlp += [nn.Linear(features, features, bias=False), nn.BatchNorm1d(features), nn.ReLU(inplace=True)]
        mlp.append(nn.Linear(features, num_classes))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        x = F.adaptive_avg_pool2d(features, (math.ceil(h / 4), math.ceil(w / 4)))
        x = self.convs(x)
        x = F.adaptive_avg_pool2d(x, self.mlp_in_size).flatten(1)
        return self.mlp(x)


def _build_dgl_head(partition: Partition, index: int, num_classes: int) -> DGLHead:
    """DGL head for block ``index``: width from its BlockSpec, MLP input size from its map size."""
    h, w = block_feature_size(partition, index)
    mlp_in_size = min(2, math.ceil(min(h, w) / 4))
    return DGLHead(partition.specs[index].out_chs, mlp_in_size, num_classes)


@register_method("dgl")
class DGL(LocalModules, LocalMethod):
    """Decoupled greedy learning: a small conv + MLP classifier on every local module but the last."""

    def __init__(self, local_modules: int | None = None, local_module_ends: Sequence[int] | None = None) -> None:
        self._init_modules(local_modules, local_module_ends)

    def config(self) -> dict[str, Any]:
        return self._modules_config()

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        return module_stages(partition, self.module_ends(partition),
                             lambda index, k: _build_dgl_head(partition, index, num_classes), self.name)
