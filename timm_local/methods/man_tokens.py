"""MAN++ on token models: the official ViT variant (JunhaoSu0/MAN_PlusPlus, ``Exp_on_ImageNet/networks/vit_man.py``).

The CNN heads (InfoPro's decoder and classifier on a feature map) have no grid to work on when a block
outputs tokens (B, N, C). MAN++'s authors give ViTs their own head, read to match:

* ``LB``: trained, freshly initialised copies of the next module's first *two* blocks
  (:data:`TOKEN_AUX_DEPTH`; fewer when the next module is shorter);
* ``EMA``: a frozen fresh copy of the next module's first block, moved towards it with momentum 0.995;
* ``y = s·LB[0](h) + (2 − s)·EMA(h)`` with a learnable s (initialised to 1), then the other LB blocks,
  a LayerNorm (eps 1e-6) and a linear classifier on the class token; the loss is cross-entropy alone
  (no reconstruction term);
* the EMA step comes inside the local forward, after the loss and *before* its backward, through the
  parameters' ``.data`` as the official code does: the backward through the EMA copy therefore sees the
  moved weights, and the result is bitwise the official one;
* the modules are K equal runs of transformer blocks, the patch embedding inside the first (no
  stem-level head): the official release supports K = 4; other K that divide the depth use the same
  rule, and the rest fall back to the cost-balanced split every method has.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..partition import Partition
from ._shared import module_stages, parameter_pairs
from .base import LocalHead, LocalStage, classification_loss

#: How many of the next module's blocks the trained branch copies (``MANPP_VIT_AUX_DEPTH``).
TOKEN_AUX_DEPTH = 2
#: The ViT model's EMA momentum default (the CNN variant's is 0.999).
TOKEN_MOMENTUM = 0.995


def is_token_model(partition: Partition) -> bool:
    """Every block outputs tokens: the ViT variant applies (a model mixing maps and tokens gets the CNN one)."""
    return all(spec.layout == "NLC" for spec in partition.specs)


def token_module_ends(partition: Partition, num_modules: int) -> list[int] | None:
    """Equal runs of ``depth / K`` blocks after the embedding (the official grouping), if K divides the depth."""
    depth = len(partition) - 1  # block 0 is the patch embedding, which joins the first module
    if depth % num_modules:
        return None
    per_module = depth // num_modules
    return [per_module * (k + 1) for k in range(num_modules)]


def class_token_pool(model: nn.Module) -> str:
    """``token`` where the model has a class token (the official head reads token 0), else ``avg``."""
    return "token" if getattr(model, "cls_token", None) is not None else "avg"


class TokenMomentumHead(LocalHead):
    """``s·LB[0](h) + (2 − s)·EMA(h)`` → the other LB blocks → LayerNorm → linear on the pooled token.

    ``primary`` is the backbone block the EMA copy follows, kept outside the module tree (a tuple)
    because it belongs to the next local module.
    """

    def __init__(self, lb: nn.Sequential, ema: nn.Module, dim: int, num_classes: int, momentum: float,
                 primary: nn.Module, primary_index: int, pool: str = "token") -> None:
        super().__init__()
        self.lb = lb
        self.ema = ema.requires_grad_(False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)  # the official model's init of every Linear
        nn.init.zeros_(self.classifier.bias)
        self.s = nn.Parameter(torch.tensor(1.0))
        self.momentum, self.pool = float(momentum), pool
        self.primary = (primary,)
        self.reads_blocks = (primary_index,)
        parameter_pairs(ema, primary)  # refuse a copy that cannot follow its block, at build time

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        y = self.s * self.lb[0](features) + (2 - self.s) * self.ema(features)
        for block in self.lb[1:]:
            y = block(y)
        y = self.norm(y)
        return self.classifier(y[:, 0] if self.pool == "token" else y.mean(1))

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(features)
        loss = classification_loss(logits, target)
        if self.training:  # an evaluation pass runs the local step too; the copy moves in training only
            self.move_ema()
        return loss, logits

    @torch.no_grad()
    def move_ema(self) -> None:
        """``ema = ema·m + w·(1 − m)`` in place on ``.data``, the official expression and its rounding."""
        m = self.momentum
        for ema, weight in parameter_pairs(self.ema, self.primary[0]):
            ema.data.mul_(m).add_(weight.data, alpha=1 - m)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, pool={self.pool}"


def token_stages(partition: Partition, ends: Sequence[int], num_classes: int, momentum: float,
                 copy_block: Callable[[int, int], nn.Module], method: str) -> list[LocalStage]:
    """One stage per module, MAN++'s token head on each but the last.

    ``copy_block(j, source)`` is a fresh copy of block ``j`` fed with block ``source``'s output.
    """
    pool = class_token_pool(partition.model)

    def make_head(index: int, k: int) -> TokenMomentumHead:
        first = index + 1
        last = min(first + TOKEN_AUX_DEPTH, ends[k + 1] + 1)  # within the next module
        lb = nn.Sequential(*[copy_block(j, j - 1 if j > first else index) for j in range(first, last)])
        return TokenMomentumHead(lb, copy_block(first, index), partition.specs[first].shape[-1], num_classes,
                                 momentum, partition.blocks[first], first, pool)

    return module_stages(partition, ends, make_head, method, channels_first=False, feature_maps=False)
