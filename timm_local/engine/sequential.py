"""One process, blocks in order, a backward per local loss as soon as it exists.

Calling ``backward`` stage by stage (instead of summing the losses) is what frees each block's
graph before the next block runs: the peak memory is one stage's graph, not the network's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..methods.base import LocalStage
from ..partition import Partition
from .stage import Backward, check_finite_losses, default_backward, run_stage, stage_sums

__all__ = ["LocalStepOutput", "sequential_local_step"]


@dataclass
class LocalStepOutput:
    """Detached results of one local step: a loss per stage (last = network output loss)."""

    losses: list[torch.Tensor]
    logits: torch.Tensor
    head_logits: list[torch.Tensor | None]

    def sums(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-stage loss and accuracy sums of this batch (:func:`~timm_local.engine.stage.stage_sums`)."""
        logits = {j: h for j, h in enumerate(self.head_logits)}
        logits[len(self.losses) - 1] = self.logits
        return stage_sums(dict(enumerate(self.losses)), logits, target, len(self.losses))


def sequential_local_step(
    partition: Partition,
    stages: Sequence[LocalStage],
    inputs: torch.Tensor,
    target: torch.Tensor,
    backward: Backward | None = None,
) -> LocalStepOutput:
    """Run every stage on a detached input and back-propagate its loss immediately."""
    backward = backward or default_backward
    losses: list[torch.Tensor] = []
    head_logits: list[torch.Tensor | None] = []
    h = inputs
    logits = None
    previous = None  # (stage, its detached input): what a cascade stage runs again
    for stage in stages:
        h_in = h.detach()
        h, loss, stage_logits = run_stage(partition, stage, h_in, target, inputs, previous)
        previous = (stage, h_in)
        if not stage.has_loss:
            losses.append(loss)
            head_logits.append(None)
            continue
        backward(loss)
        if stage.head is not None:
            stage.head.after_backward()
        losses.append(loss.detach())
        detached = None if stage_logits is None else stage_logits.detach()
        if stage.head is None:
            logits = detached
        head_logits.append(None if stage.head is None else detached)
    assert logits is not None, "a method's last stage must use the network's own top (head=None)"
    check_finite_losses(dict(enumerate(losses)), partition, stages)
    return LocalStepOutput(losses, logits, head_logits)
