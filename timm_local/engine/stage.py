"""One local stage, as every engine runs it: forward from a detached input, its loss, the checks.

Engines differ in *where* stages run (one process, or segments of a pipeline) but not in *what* a
stage computes; keeping that here means the sequential and pipelined engines cannot drift apart
(same forward, same activation checkpointing, same finiteness check, same per-stage statistics).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..methods.base import LocalStage, classification_loss
from ..partition import Partition
from .speed import match_memory_format

__all__ = ["Backward", "check_finite_losses", "default_backward", "run_stage", "stage_sums"]

Backward = Callable[[torch.Tensor], None]


def default_backward(loss: torch.Tensor) -> None:
    """``loss.backward()``; training passes ``accelerator.backward`` instead (grad scaling)."""
    loss.backward()


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


def _run_blocks(partition: Partition, stage: LocalStage, h: torch.Tensor) -> torch.Tensor:
    """The stage's primary blocks on ``h`` (activation-checkpointed when the stage asks for it)."""
    h = match_memory_format(h, partition.blocks[stage.blocks[0]])
    for index in stage.blocks:
        block = partition.blocks[index]
        if stage.checkpoint and torch.is_grad_enabled():
            h = _checkpointed(block, h)
        else:
            h = block(h)
    return h


def _stage_loss(partition: Partition, stage: LocalStage, h: torch.Tensor, target: torch.Tensor,
                inputs: torch.Tensor, cascade: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    if stage.head is None:
        logits = partition.top(h)
        return classification_loss(logits, target), logits
    if cascade:
        return stage.head.cascade_loss(h, target, inputs)
    return stage.head.local_loss(h, target, inputs)


def run_stage(
    partition: Partition,
    stage: LocalStage,
    h: torch.Tensor,
    target: torch.Tensor,
    inputs: torch.Tensor,
    previous: tuple[LocalStage, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward one stage from its (already detached) input: (output, loss, logits).

    The input takes the memory format of the stage's first block (channels-last models, :mod:`.speed`).
    A stage without a loss of its own runs without a graph and returns a zero loss (no backward). A
    cascade stage (:attr:`LocalStage.cascade`) also runs ``previous`` = (the previous stage, its detached
    input) again with a graph and its own blocks on top, so its cascade loss reaches that stage and no
    further; the engines keep that one input alive for it.
    """
    if not stage.has_loss:
        with torch.no_grad():
            h = _run_blocks(partition, stage, h)
        return h, torch.zeros((), device=h.device), None
    h = _run_blocks(partition, stage, h)
    loss, logits = _stage_loss(partition, stage, h, target, inputs)
    if stage.cascade is not None:
        if previous is None:
            raise ValueError("a cascade stage needs the previous stage and its input (the first stage cannot be one)")
        z = _run_blocks(partition, stage, _run_blocks(partition, previous[0], previous[1]))
        own, through = stage.cascade
        loss = own * loss + through * _stage_loss(partition, stage, z, target, inputs, cascade=True)[0]
    return h, loss, logits


#: How long a pipeline segment that *received* non-finite activations waits before it reports them: the
#: segment upstream found them first and is reporting the stage that produced them, and launchers (torchrun,
#: ``mp.spawn``) report the earliest failure as the root cause. Only the error path waits.
_UPSTREAM_REPORT_GRACE_S = 5.0


def check_finite_losses(losses: Mapping[int, torch.Tensor], partition: Partition, stages: Sequence[LocalStage],
                        where: str = "", received: Optional[torch.Tensor] = None) -> None:
    """Raise ``FloatingPointError`` naming the first stage whose loss is NaN/inf.

    One check (one device sync) per step rather than per stage; the caller must not take an
    optimizer step after this error (the bad stage's gradients are not finite). ``received``: the
    activation a downstream pipeline segment received; when it is itself non-finite the error says so,
    after letting the upstream segment report first (:data:`_UPSTREAM_REPORT_GRACE_S`).
    """
    indices = list(losses)
    finite = torch.isfinite(torch.stack([losses[j] for j in indices]))
    if bool(finite.all()):
        return
    if received is not None and not bool(torch.isfinite(received).all()):
        time.sleep(_UPSTREAM_REPORT_GRACE_S)
        raise FloatingPointError(f"the activation received from the previous pipeline segment is not finite{where}; "
                                 f"that segment's error names the stage that produced it")
    bad = indices[int((~finite).nonzero()[0])]
    raise FloatingPointError(
        f"local loss of the stage ending at block {partition.names[stages[bad].blocks[-1]]!r} is "
        f"{losses[bad].item()}{where}; lower the learning rate or check the input normalisation"
    )


def stage_sums(losses: Mapping[int, torch.Tensor], logits: Mapping[int, torch.Tensor | None],
               target: torch.Tensor, num_stages: int) -> dict[str, torch.Tensor]:
    """Per-local-stage sums over one batch: the statistics a training log aggregates.

    ``loss_sum[j]`` (loss × samples), ``samples[j]``, ``correct[j]`` (top-1 hits of stage j's logits:
    its head's, or the network's for the last stage) and ``scored[j]`` (samples of stages that returned
    logits); zero for stages not in ``losses`` (another pipeline segment runs them). Summed over steps
    and processes, ``loss_sum / samples`` and ``correct / scored`` are every stage's mean loss and accuracy.
    """
    device = target.device
    loss_sum = torch.zeros(num_stages, dtype=torch.float64, device=device)
    correct = torch.zeros_like(loss_sum)
    samples = torch.zeros_like(loss_sum)
    scored = torch.zeros_like(loss_sum)
    batch = target.shape[0]
    labels = target if target.ndim == 1 else target.argmax(1)  # soft targets (mixup)
    for j, loss in losses.items():
        loss_sum[j] = loss.double() * batch
        samples[j] = batch
        stage_logits = logits.get(j)
        if stage_logits is not None:
            correct[j] = (stage_logits.argmax(1) == labels).sum().double()
            scored[j] = batch
    return {"loss_sum": loss_sum, "samples": samples, "correct": correct, "scored": scored}
