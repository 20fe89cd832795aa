"""The training targets of a recipe: class labels, or class distributions (label smoothing, mixup/cutmix).

Why in the loop, before the engine: the targets then reach every local loss and the network's own alike
(:func:`~timm_local.methods.base.classification_loss`), whichever engine runs them -- a pipeline's first
segment mixes the batch and the mixed targets travel downstream with the activations. Mixing is timm's
``Mixup`` (its random draws come from numpy's global generator, which Accelerate checkpoints, so a
resumed run mixes as an uninterrupted one); smoothing alone is timm's ``mixup_target`` at lam=1, i.e.
``(1 - s) * one_hot + s / C``, the target of timm's ``LabelSmoothingCrossEntropy``.
"""
from __future__ import annotations

from typing import Any, Optional

from ..config import ConfigError, TrainConfig
from ..timm_options import uses_soft_targets

__all__ = ["Targets"]


class Targets:
    """``(x, y) -> (x, target)`` of one micro-batch, as the run's recipe asks."""

    def __init__(self, cfg: TrainConfig, num_classes: int, method: Any) -> None:
        if uses_soft_targets(cfg) and getattr(method, "labels_only", None):
            raise ConfigError(f"method {method.name!r} cannot take --smoothing / --mixup / --cutmix: "
                              f"{method.labels_only}; drop those flags or choose another --method")
        self.num_classes = num_classes
        self.smoothing = cfg.smoothing
        self.mixup: Optional[Any] = None
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=num_classes)

    def check_batch(self, per_process_batch: int) -> None:
        """Mixup pairs each image with another of its micro-batch: the micro-batch must be even."""
        if self.mixup is not None and per_process_batch % 2:
            raise ConfigError(f"--mixup/--cutmix pair the images of each process's micro-batch, which holds "
                              f"{per_process_batch}: choose a --batch-size that makes it even")

    def __call__(self, x: Any, y: Any) -> tuple[Any, Any]:
        if x is None:  # a pipeline segment after the first: the targets arrive with the activations
            return x, y
        if self.mixup is not None:
            return self.mixup(x, y)
        if self.smoothing > 0:
            from timm.data.mixup import mixup_target

            return x, mixup_target(y, self.num_classes, smoothing=self.smoothing)
        return x, y
