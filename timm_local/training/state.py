"""What a run carries from step to step (checkpointed) and what it returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["TrainResult", "TrainState"]


@dataclass
class TrainState:
    """Loop position and best result; saved with every checkpoint (registered with Accelerate)."""

    epoch: int = 0  # current epoch (0-based); == epochs when training is complete
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1  # the epoch best by --eval-metric (epoch-end evaluations only)
    best_metric: Optional[float] = None  # its --eval-metric value
    last_top1: Optional[float] = None
    train_time_s: float = 0.0
    #: the train-metric sums since the last train row, summed over processes (:class:`~.metrics.TrainWindow`)
    window: Optional[list[float]] = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class TrainResult:
    """What :func:`timm_local.training.train` returns (also summarised in the last ``metrics.jsonl`` row)."""

    output_dir: Path
    top1: Optional[float]
    best_top1: Optional[float]
    global_step: int
    epochs_completed: int
    train_time_s: float
    export_dir: Optional[Path]
    last_checkpoint: Optional[Path]
    metrics: list[dict[str, Any]] = field(default_factory=list)
