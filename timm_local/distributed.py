"""The collectives both engines use: gradient averaging and in-place broadcast, on flattened buckets.

Why hand-written rather than DDP: DDP all-reduces inside ``backward`` and assumes one backward per
step, while a local step calls ``backward`` once per local loss (that is what frees each block's graph).
So gradients are averaged here, once per step (sequential engine) or once per local stage (pipeline
engine), with DDP's arithmetic: sum over processes, divide by their number. Tensors are packed into
flat buckets of one dtype and device, so a model with hundreds of parameters costs a few messages.

Everything here needs only an initialised ``torch.distributed`` process group (Accelerate's, torchrun's
or :func:`timm_local.engine.launch_local`'s); with none, or a single process, it does nothing.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["BUCKET_BYTES", "GradientAverage", "average_gradients", "broadcast_tensors", "buckets", "is_distributed"]

#: DDP's default bucket size (25 MiB).
BUCKET_BYTES = 25 * 2**20


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def buckets(tensors: Iterable[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of ``tensors`` of one dtype and device, each at most ``bucket_bytes`` (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _flatten(bucket: Sequence[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device or t.device) for t in bucket])


@torch.no_grad()
def _unflatten_into(bucket: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(chunk.view_as(t))


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0, comm_device: torch.device | None = None,
                      group: Any = None) -> None:
    """Overwrite ``tensors`` on every process with process ``src``'s values (DDP's start-up broadcast).

    ``comm_device`` stages device tensors through another device (gloo moves host memory only).
    """
    if not is_distributed():
        return
    receiving = dist.get_rank() != src
    for bucket in buckets(tensors):
        flat = _flatten(bucket, comm_device)
        dist.broadcast(flat, src, group=group)
        if receiving:
            _unflatten_into(bucket, flat)


class GradientAverage:
    """Asynchronous average of the gradients of ``params`` over the processes of ``group``.

    Construction posts the all-reduces (so communication overlaps whatever the caller computes next);
    :meth:`finish` waits and writes the averages back into ``.grad``. Parameters without a gradient are
    skipped: every process runs the same local step, so they lack one everywhere.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], num_processes: int, group: Any = None,
                 comm_device: torch.device | None = None) -> None:
        self.num_processes = num_processes
        self.jobs: list[tuple[list[torch.Tensor], torch.Tensor, Any]] = []
        grads = [p.grad for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise NotImplementedError("sparse gradients cannot be averaged by timm_local's engines")
        for bucket in buckets(grads):
            flat = _flatten(bucket, comm_device)
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
            self.jobs.append((bucket, flat, work))

    @torch.no_grad()
    def finish(self) -> None:
        for bucket, flat, work in self.jobs:
            work.wait()
            flat.div_(self.num_processes)
            _unflatten_into(bucket, flat)
        self.jobs = []


def average_gradients(parameters: Iterable[torch.nn.Parameter], num_processes: int | None = None) -> None:
    """All-reduce and average ``.grad`` across all processes, once, after every local backward has run."""
    if not is_distributed():
        return
    world = num_processes or dist.get_world_size()
    if world > 1:
        GradientAverage(parameters, world).finish()
