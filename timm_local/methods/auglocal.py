"""AugLocal (Ma et al., ICLR 2024), exactly as docs/spec.md §2.

Each block ℓ = 0..K-2 gets an auxiliary network made of fresh copies of a uniform selection
of the blocks after it, with a depth that shrinks linearly towards the output (pyramidal
schedule). The last D+1 blocks are trained together by the network's own loss.

``heads="imagenet"`` follows the authors' ImageNet script instead: every block but the last gets
an auxiliary network (one whose remaining blocks are fewer than its depth copies all of them), the
last block alone is trained by the network's loss, and no auxiliary classifier has BatchNorm1d.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..partition import BlockSpec, Partition
from .base import LocalHead, LocalMethod, LocalStage, register_method
from .model_pooling import HeadPooling
from .modules import LocalModules


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


#: Which blocks get an auxiliary network. "cifar": blocks 0..K-2 with K = N - D, the last D+1 blocks
#: trained jointly by the network's loss (docs/spec.md §2.1, the authors' CIFAR code). "imagenet": every
#: block but the last, as the authors' ImageNet script (exp_imagenet) does, with no BatchNorm1d in heads.
_HEAD_RULES = ("cifar", "imagenet")


def _num_local_stages_with_heads(num_blocks: int, aux_depth: int, heads: str = "cifar") -> int:
    """Number of auxiliary networks: K - 1 (blocks 0..K-2, K = N - D), or N - 1 for ``heads="imagenet"``."""
    if heads == "imagenet":
        if num_blocks < 2:
            raise ValueError(f"a model of {num_blocks} local block has no block to give an auxiliary network")
        return num_blocks - 1
    k = num_blocks - (aux_depth - 1)
    if k < 2:
        raise ValueError(
            f"aux_depth={aux_depth} leaves no block with an auxiliary network in a model of "
            f"{num_blocks} local blocks; use aux_depth <= {num_blocks - 1}"
        )
    return k - 1


def pyramid_depths(num_blocks: int, aux_depth: int, tau: float, heads: str = "cifar") -> list[int]:
    """D_i = max(1, round(D - τ (D-1) i / (K-2))) for i = 0..K-2 (Python round: half to even).

    With ``heads="imagenet"`` the same schedule runs over the N-1 heads (the ImageNet script's
    ``paramid_coeff`` rule, whose denominator is N-2).
    """
    validate_hparams(aux_depth, tau)
    d_blocks = aux_depth - 1
    n_heads = _num_local_stages_with_heads(num_blocks, aux_depth, heads)
    span = max(1, n_heads - 1)  # K-2; a single head (K=2) keeps the full depth
    return [max(1, round(d_blocks - tau * (d_blocks - 1) * i / span)) for i in range(n_heads)]


def uniform_selection(block: int, depth: int, num_blocks: int) -> tuple[int, ...]:
    """The blocks copied for ``block``; the last one is always the network's last block."""
    remaining = num_blocks - 1 - block
    if depth >= remaining:
        return tuple(range(block + 1, num_blocks))
    return tuple(round(block + j * remaining / depth) for j in range(1, depth + 1))


def downsampling_strides(block: int, selection: tuple[int, ...], specs: list[BlockSpec]) -> tuple[int, ...]:
    """Stride of each auxiliary layer from the running downsampling deficit (docs/spec.md §2.5)."""
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


def shape_rule_strides(block: int, selection: tuple[int, ...], specs: list[BlockSpec]) -> tuple[int, ...]:
    """Total stride of each auxiliary layer under the shape rule (generic copies, docs/method.md).

    A generic copy of block j sees block j's own input resolution (a projection supplies the
    missing downsampling), so each layer reduces by exactly what separates the previous copied
    block's output from block j's.
    """
    strides, previous = [], specs[block].reduction
    for j in selection:
        strides.append(max(1, round(specs[j].reduction / previous)))
        previous = specs[j].reduction
    return tuple(strides)


def auglocal_plans(
    specs: list[BlockSpec], aux_depth: int, tau: float, heads: str = "cifar", shape_rule: bool = False
) -> list[AuxPlan]:
    """The auxiliary network of every head block (0..K-2, or 0..N-2), from the block specs alone.

    ``shape_rule``: strides as generic copies realise them (:func:`shape_rule_strides`) rather
    than the paper's downsampling deficit.
    """
    n = len(specs)
    strides_of = shape_rule_strides if shape_rule else downsampling_strides
    plans = []
    for block, depth in enumerate(pyramid_depths(n, aux_depth, tau, heads)):
        selection = uniform_selection(block, depth, n)
        plans.append(AuxPlan(block, depth, selection, strides_of(block, selection, specs)))
    return plans


def module_plans(
    specs: list[BlockSpec], ends: Sequence[int], aux_depth: int, tau: float, shape_rule: bool = False
) -> list[AuxPlan]:
    """The auxiliary network of every local module but the last (``ends``: each module's last block).

    The paper's rule read at module granularity: module m's network copies a uniform selection of the
    blocks *after* its last block (the last always the network's last block, all of them when fewer
    remain than its depth), with the pyramidal depth over the K-1 heads.
    """
    validate_hparams(aux_depth, tau)
    d_blocks, n_heads = aux_depth - 1, len(ends) - 1
    span = max(1, n_heads - 1)
    strides_of = shape_rule_strides if shape_rule else downsampling_strides
    plans = []
    for m, block in enumerate(ends[:-1]):
        depth = max(1, round(d_blocks - tau * (d_blocks - 1) * m / span))
        selection = uniform_selection(block, depth, len(specs))
        plans.append(AuxPlan(block, depth, selection, strides_of(block, selection, specs)))
    return plans


def partition_plans(partition: Partition, aux_depth: int, tau: float, heads: str = "cifar",
                    ends: Sequence[int] | None = None) -> list[AuxPlan]:
    """:func:`auglocal_plans` (or :func:`module_plans` for given module ``ends``) with the stride rule of the
    partition's family."""
    if ends is not None:
        return module_plans(partition.specs, ends, aux_depth, tau, shape_rule=partition.copies_keep_shape)
    return auglocal_plans(partition.specs, aux_depth, tau, heads, shape_rule=partition.copies_keep_shape)


def plan_stages(plans: Sequence[AuxPlan], heads: Sequence[LocalHead], num_blocks: int) -> list[LocalStage]:
    """A stage per plan (its module: the blocks after the previous plan's block up to its own) with its
    head, then the remaining blocks under the network's own loss."""
    stages, start = [], 0
    for plan, head in zip(plans, heads):
        stages.append(LocalStage(list(range(start, plan.block + 1)), head))
        start = plan.block + 1
    stages.append(LocalStage(list(range(start, num_blocks))))
    return stages


class AugLocalHead(LocalHead):
    """Copied blocks → global average pool → flatten → (BatchNorm1d) → [MLP] → linear.

    ``norm`` says whether BatchNorm1d precedes the classifier; the paper (and its code) puts it only
    in one-block heads (docs/spec.md §2.6), see :data:`_HEAD_NORM_RULES`.
    ``hidden`` > 0 inserts the two hidden fully connected layers of a VGG-style classifier at that
    width: the paper's VGG13 on ImageNet gives its auxiliary classifiers width 512 instead of VGG's
    4096 (docs/spec.md §5). 0, the default, is the head of §2.6.
    """

    def __init__(self, layers: list[nn.Module], num_features: int, num_classes: int, hidden: int = 0,
                 norm: bool | None = None, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        # token / channels-last models pool as their own head does (model_pooling.ModelPooling)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool is None else pool
        norm = len(layers) == 1 if norm is None else norm
        self.norm = nn.BatchNorm1d(num_features) if norm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        ) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(features)).flatten(1)
        return self.fc(self.mlp(self.norm(x)))


def head_pooling(partition: Partition) -> HeadPooling | None:
    """The recorded head pooling every auxiliary network of ``partition`` shares (each ends at the
    network's last block), or None where they average-pool a (B, C, H, W) map."""
    return HeadPooling(partition) if partition.specs[-1].layout != "NCHW" else None


# Whether BatchNorm1d sits before an auxiliary classifier. "paper": only in one-block heads (§2.6).
# "always" is ours: at short budgets a deeper head whose last copied block changes shape (projection
# shortcut) trains markedly slower without it -- measured in docs/accuracy.md.
_HEAD_NORM_RULES = ("paper", "always", "never")


def build_auglocal_head(partition: Partition, plan: AuxPlan, num_classes: int, hidden: int = 0,
                        head_norm: str = "paper", heads: str = "cifar",
                        pooling: HeadPooling | None = None) -> AugLocalHead:
    """``plan``'s auxiliary network; ``pooling``: the model's recorded head pooling, shared by a method's
    heads (token and channels-last models; recorded here when not given)."""
    layers = []
    in_chs = partition.specs[plan.block].out_chs
    if partition.copies_keep_shape:
        source = partition.specs[plan.block]
        for j in plan.selection:
            layers.append(partition.make_shaped_copy(j, source))
            source = partition.specs[j]
        in_chs = source.out_chs
    else:
        for j, stride in zip(plan.selection, plan.strides):
            layers.append(partition.make_block_like(j, in_chs, stride))
            in_chs = partition.specs[j].out_chs
    pool = None
    paper_norm = None if heads == "cifar" else False
    if partition.specs[plan.selection[-1]].layout != "NCHW":
        pooling = pooling or HeadPooling(partition)
        pool = pooling.make()
        in_chs = pooling.width(pool)
        paper_norm = False  # the model's own norm (in its last block or its head) normalises the features
    norm = {"paper": paper_norm, "always": True, "never": False}[head_norm]
    head = AugLocalHead(layers, in_chs, num_classes, hidden, norm, pool)
    if isinstance(head.norm, nn.BatchNorm1d):
        nn.init.ones_(head.norm.weight)
        nn.init.zeros_(head.norm.bias)
    return head


@register_method("auglocal")
class AugLocal(LocalModules, LocalMethod):
    def __init__(self, aux_depth: int = 3, tau: float = 0.5, head_hidden: int = 0, head_norm: str = "paper",
                 heads: str = "cifar", local_modules: int | None = None,
                 local_module_ends: Sequence[int] | None = None) -> None:
        validate_hparams(aux_depth, tau)
        self._init_modules(local_modules, local_module_ends)
        if not isinstance(head_hidden, int) or isinstance(head_hidden, bool) or head_hidden < 0:
            raise ValueError(f"head_hidden (width of the auxiliary classifier's two hidden layers) must be an "
                             f"integer >= 0, got {head_hidden!r}; 0 = pool + linear as in the paper's CIFAR heads")
        if head_norm not in _HEAD_NORM_RULES:
            raise ValueError(f"head_norm must be one of {_HEAD_NORM_RULES}, got {head_norm!r}; 'paper' puts "
                             f"BatchNorm1d only in one-block heads (docs/spec.md §2.6)")
        if heads not in _HEAD_RULES:
            raise ValueError(f"heads must be one of {_HEAD_RULES}, got {heads!r}: 'cifar' gives blocks 0..K-2 "
                             f"an auxiliary network (K = N - D), 'imagenet' every block but the last")
        self.aux_depth = aux_depth
        self.tau = float(tau)
        self.head_hidden = head_hidden
        self.head_norm = head_norm
        self.heads = heads

    def config(self) -> dict[str, Any]:
        # the paper's settings always, an extension only when used: method_config names what departs from the paper
        extras: dict[str, Any] = {"head_hidden": self.head_hidden} if self.head_hidden else {}
        if self.head_norm != "paper":
            extras["head_norm"] = self.head_norm
        if self.heads != "cifar":
            extras["heads"] = self.heads
        return {"aux_depth": self.aux_depth, "tau": self.tau, **extras, **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        ends = self.module_ends(partition) if self.modules_given else None
        plans = partition_plans(partition, self.aux_depth, self.tau, self.heads, ends)
        pooling = head_pooling(partition)
        heads = [build_auglocal_head(partition, p, num_classes, self.head_hidden, self.head_norm, self.heads, pooling)
                 for p in plans]
        return plan_stages(plans, heads, len(partition))
