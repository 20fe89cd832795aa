"""Pretrained-config helpers shared by the CIFAR architectures."""
from __future__ import annotations

from typing import Any

from ..data.recipes import CIFAR_MEAN, CIFAR_STD  # one source for the paper's CIFAR statistics

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "cifar_cfg"]


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """A timm pretrained_cfg for a 32x32 CIFAR model.

    There are no hosted weights (``url`` empty): the cfg exists so that timm's builder, the
    ``local-dir:`` / ``pretrained_cfg_overlay=dict(file=...)`` loaders and data config
    resolution (mean/std/input size) treat these models exactly like timm's own.
    """
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }
