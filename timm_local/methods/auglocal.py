"""AugLocal (Ma et al., ICLR 2024), exactly as ../shared/AUGLOCAL.md §2.

Each block ℓ = 0..K-2 gets an auxiliary network made of fresh copies of a uniform selection
of the blocks after it, with a depth that shrinks linearly towards the output (pyramidal
schedule). The last D+1 blocks are trained together by the network's own loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..partition import BlockSpec, Partition
from .base import LocalHead, LocalMethod, LocalStage, register_method


@dataclass(frozen=True)
class AuxPlan:
    """The auxiliary network of one block: which primary blocks it copies, at which strides."""

    block: int
    depth: int  # D_ℓ: number of copied blocks (the paper's d_ℓ minus the linear layer)
    selection: tuple[int, ...]
    strides: tuple[int, ...]


def validate_hparams(aux_depth: int, tau: float) -> None:
    if not isinstance(aux_depth, int) or isinstance(aux_depth, bool) or aux_depth < 2:
        raise ValueError(
            f"aux_depth (the paper's d, counting the final linear layer) must be an integer >= 2, "
            f"got {aux_depth!r}; d=2 is one copied block + pool + linear"
        )
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau (pyramidal depth coefficient) must be in [0, 1], got {tau!r}; 0 disables it")


def num_local_stages_with_heads(num_blocks: int, aux_depth: int) -> int:
    """K - 1: blocks 0..K-2 get an auxiliary network, with K = N - D."""
    k = num_blocks - (aux_depth - 1)
    if k < 2:
        raise ValueError(
            f"aux_depth={aux_depth} leaves no block with an auxiliary network in a model of "
            f"{num_blocks} local blocks; use aux_depth <= {num_blocks - 1}"
        )
    return k - 1


def pyramid_depths(num_blocks: int, aux_depth: int, tau: float) -> list[int]:
    """D_i = max(1, round(D - τ (D-1) i / (K-2))) for i = 0..K-2 (Python round: half to even)."""
    validate_hparams(aux_depth, tau)
    d_blocks = aux_depth - 1
    n_heads = num_local_stages_with_heads(num_blocks, aux_depth)
    span = max(1, n_heads - 1)  # K-2; a single head (K=2) keeps the full depth
    return [max(1, round(d_blocks - tau * (d_blocks - 1) * i / span)) for i in range(n_heads)]


def uniform_selection(block: int, depth: int, num_blocks: int) -> tuple[int, ...]:
    """The blocks copied for ``block``; the last one is always the network's last block."""
    remaining = num_blocks - 1 - block
    if depth >= remaining:
        return tuple(range(block + 1, num_blocks))
    return tuple(round(block + j * remaining / depth) for j in range(1, depth + 1))


def downsampling_strides(block: int, selection: tuple[int, ...], specs: list[BlockSpec]) -> tuple[int, ...]:
    """Stride of each auxiliary layer from the running downsampling deficit (AUGLOCAL.md §2.5)."""
    deficit = 0.0
    strides = []
    previous = specs[block].reduction
    for j in selection:
        deficit += math.log2(specs[j].reduction / previous)
        previous = specs[j].reduction
        if deficit >= 1 - 1e-9:
            strides.append(2)
            deficit -= 1
        else:
            strides.append(1)
    return tuple(strides)


def auglocal_plans(specs: list[BlockSpec], aux_depth: int, tau: float) -> list[AuxPlan]:
    """The auxiliary network of every block 0..K-2, from the partition's block specs alone."""
    n = len(specs)
    plans = []
    for block, depth in enumerate(pyramid_depths(n, aux_depth, tau)):
        selection = uniform_selection(block, depth, n)
        plans.append(AuxPlan(block, depth, selection, downsampling_strides(block, selection, specs)))
    return plans


class AugLocalHead(LocalHead):
    """Copied blocks → global average pool → flatten → (BatchNorm1d) → [MLP] → linear.

    ``norm`` says whether BatchNorm1d precedes the classifier; the paper (and its code) puts it only
    in one-block heads (AUGLOCAL.md §2.6), see :data:`HEAD_NORM_RULES`.
    ``hidden`` > 0 inserts the two hidden fully connected layers of a VGG-style classifier at that
    width: the paper's VGG13 on ImageNet gives its auxiliary classifiers width 512 instead of VGG's
    4096 (AUGLOCAL.md §5). 0, the default, is the head of §2.6.
    """

    def __init__(self, layers: list[nn.Module], num_features: int, num_classes: int, hidden: int = 0,
                 norm: bool | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        norm = len(layers) == 1 if norm is None else norm
        self.norm = nn.BatchNorm1d(num_features) if norm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        ) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(features)).flatten(1)
        return self.fc(self.mlp(self.norm(x)))


# Whether BatchNorm1d sits before an auxiliary classifier. "paper": only in one-block heads (§2.6).
# "always" is ours: at short budgets a deeper head whose last copied block changes shape (projection
# shortcut) trains markedly slower without it -- measured in docs/accuracy.md.
HEAD_NORM_RULES = ("paper", "always", "never")


def build_auglocal_head(partition: Partition, plan: AuxPlan, num_classes: int, hidden: int = 0,
                        head_norm: str = "paper") -> AugLocalHead:
    layers = []
    in_chs = partition.specs[plan.block].out_chs
    for j, stride in zip(plan.selection, plan.strides):
        layers.append(partition.make_block_like(j, in_chs, stride))
        in_chs = partition.specs[j].out_chs
    norm = {"paper": None, "always": True, "never": False}[head_norm]
    head = AugLocalHead(layers, in_chs, num_classes, hidden, norm)
    if isinstance(head.norm, nn.BatchNorm1d):
        nn.init.ones_(head.norm.weight)
        nn.init.zeros_(head.norm.bias)
    return head


@register_method("auglocal")
class AugLocal(LocalMethod):
    def __init__(self, aux_depth: int = 3, tau: float = 0.5, head_hidden: int = 0, head_norm: str = "paper") -> None:
        validate_hparams(aux_depth, tau)
        if not isinstance(head_hidden, int) or isinstance(head_hidden, bool) or head_hidden < 0:
            raise ValueError(f"head_hidden (width of the auxiliary classifier's two hidden layers) must be an "
                             f"integer >= 0, got {head_hidden!r}; 0 = pool + linear as in the paper's CIFAR heads")
        if head_norm not in HEAD_NORM_RULES:
            raise ValueError(f"head_norm must be one of {HEAD_NORM_RULES}, got {head_norm!r}; 'paper' puts "
                             f"BatchNorm1d only in one-block heads (AUGLOCAL.md §2.6)")
        self.aux_depth = aux_depth
        self.tau = float(tau)
        self.head_hidden = head_hidden
        self.head_norm = head_norm

    def config(self) -> dict[str, Any]:
        # extensions only when used, so checkpoints written before they existed still match on resume
        extras = {"head_hidden": self.head_hidden} if self.head_hidden else {}
        if self.head_norm != "paper":
            extras["head_norm"] = self.head_norm
        return {"aux_depth": self.aux_depth, "tau": self.tau, **extras}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        plans = auglocal_plans(partition.specs, self.aux_depth, self.tau)
        stages = [LocalStage([p.block], build_auglocal_head(partition, p, num_classes, self.head_hidden,
                                                            self.head_norm)) for p in plans]
        stages.append(LocalStage(list(range(len(plans), len(partition)))))
        return stages
