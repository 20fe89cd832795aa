"""Optimizer builder: detectron2's SGD, plus AdamW for the paper's detection recipe (A.7).

detectron2's yacs ``build_optimizer`` is SGD-only. The idiomatic extension (as in the
detectron2 projects and MaskFormer) is a ``SOLVER.OPTIMIZER`` key and a Trainer whose
``build_optimizer`` classmethod calls this function; parameter groups (no weight decay on norm
layers, bias overrides) and gradient clipping still come from detectron2's own helpers, so every
existing ``SOLVER.*`` key keeps its meaning.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("SGD", "ADAMW")


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.SOLVER.OPTIMIZER`` (``SGD`` or ``ADAMW``)."""
    name = str(cfg.SOLVER.get("OPTIMIZER", "SGD")).upper()
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name == "ADAMW":
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        return maybe_add_gradient_clipping(cfg, optimizer)
    raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not one of {OPTIMIZERS}.")
