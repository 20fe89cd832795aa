"""One process, blocks in order, a backward per local loss as soon as it exists.

Calling ``backward`` stage by stage (instead of summing the losses) is what frees each block's
graph before the next block runs: the peak memory is one stage's graph, not the network's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..methods.base import LocalStage
from ..partition import Partition

Backward = Callable[[torch.Tensor], None]


@dataclass
class LocalStepOutput:
    """Detached results of one local step: a loss per stage (last = network output loss)."""

    losses: list[torch.Tensor]
    logits: torch.Tensor
    head_logits: list[torch.Tensor | None]


@contextlib.contextmanager
def _frozen_norm_statistics(module: torch.nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of a recomputed forward.

    Activation checkpointing runs each block's forward twice (again in backward); without this,
    BatchNorm running stats would be updated twice per step and the ``checkpoint`` baseline
    would not be the same training as BP.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [[b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _checkpointed(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return checkpoint(
        block, h, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_norm_statistics(block)),
    )


def run_stage(
    partition: Partition,
    stage: LocalStage,
    h: torch.Tensor,
    target: torch.Tensor,
    inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward one stage from its (already detached) input: (output, loss, logits)."""
    for index in stage.blocks:
        block = partition.blocks[index]
        if stage.checkpoint and torch.is_grad_enabled():
            h = _checkpointed(block, h)
        else:
            h = block(h)
    if stage.head is None:
        logits = partition.top(h)
        return h, F.cross_entropy(logits, target), logits
    loss, logits = stage.head.local_loss(h, target, inputs)
    return h, loss, logits


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def sequential_local_step(
    partition: Partition,
    stages: Sequence[LocalStage],
    inputs: torch.Tensor,
    target: torch.Tensor,
    backward: Backward | None = None,
) -> LocalStepOutput:
    """Run every stage on a detached input and back-propagate its loss immediately."""
    backward = backward or _default_backward
    losses: list[torch.Tensor] = []
    head_logits: list[torch.Tensor | None] = []
    h = inputs
    logits = None
    for stage in stages:
        h, loss, stage_logits = run_stage(partition, stage, h.detach(), target, inputs)
        backward(loss)
        losses.append(loss.detach())
        detached = None if stage_logits is None else stage_logits.detach()
        if stage.head is None:
            logits = detached
        head_logits.append(None if stage.head is None else detached)
    assert logits is not None, "a method's last stage must use the network's own top (head=None)"
    # One check (one device sync) per step rather than per stage; the caller must not take an
    # optimizer step after this error (the gradients of the bad stage are not finite).
    finite = torch.isfinite(torch.stack(losses))
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise FloatingPointError(
            f"local loss of the stage ending at block {partition.names[stages[bad].blocks[-1]]!r} is "
            f"{losses[bad].item()}; lower the learning rate or check the input normalisation"
        )
    return LocalStepOutput(losses, logits, head_logits)
