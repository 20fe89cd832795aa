"""The collectives both engines use: gradient averaging and in-place broadcast, on flattened buckets.

Why hand-written rather than DDP: DDP all-reduces inside ``backward`` and assumes one backward per
step, while a local step calls ``backward`` once per local loss (that is what frees each block's graph).
So gradients are averaged here, once per step (sequential engine) or once per local stage (pipeline
engine), with DDP's arithmetic: sum over processes, divide by their number. Tensors are packed into
flat buckets of one dtype and device, so a model with hundreds of parameters costs a few messages.

Everything here needs only an initialised ``torch.distributed`` process group (Accelerate's, torchrun's
or :func:`timm_local.engine.launch_local`'s); with none, or a single process, it does nothing.

:class:`RollCall` holds the launch checks of a multi-node run (every process arrived, the output folder
is shared): where a launch cannot work, the run stops at start with a message naming the processes and
hosts at fault, instead of hanging in its first collective.
"""
from __future__ import annotations

import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["GradientAverage", "RanksMissingError", "RollCall", "SharedFolderError", "average_gradients",
           "broadcast_tensors", "buckets", "check_gpus_per_node", "is_distributed", "missing_ranks"]

#: DDP's default bucket size (25 MiB).
_BUCKET_BYTES = 25 * 2**20


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def buckets(tensors: Iterable[torch.Tensor], bucket_bytes: int = _BUCKET_BYTES) -> Iterator[list[torch.Tensor]]:
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


# ------------------------------------------------------------------------------------------------
# launch checks
# ------------------------------------------------------------------------------------------------
class RanksMissingError(RuntimeError):
    """Processes of a launch did not reach a synchronisation point in time: dead, hung, or launched differently."""


class SharedFolderError(RuntimeError):
    """The run folder is not one shared folder: some processes cannot see what the main process writes."""


def check_gpus_per_node(local_processes: int, gpus: int) -> None:
    """Refuse more processes on a node than it has GPUs: NCCL needs one GPU per process.

    Without this check the run dies in the process group's set-up ("invalid device ordinal") or, when
    two ranks share a device, NCCL stops with "duplicate GPU" -- neither says how to launch instead.
    """
    if local_processes > gpus:
        raise ValueError(
            f"{local_processes} processes were launched on {socket.gethostname()}, which has {gpus} GPU(s): NCCL "
            f"needs one GPU per process. Launch at most --nproc-per-node {gpus} on this node (accelerate: "
            f"--num_processes {gpus} x the number of machines), or pass --cpu for a CPU (gloo) run.")


def missing_ranks(monitored_barrier_error: str) -> list[int]:
    """The ranks a failed ``torch.distributed.monitored_barrier`` names on rank 0 ("Ranks 1, 3 failed to pass")."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", monitored_barrier_error)
    return [int(r) for r in found.group(1).replace(" ", "").split(",") if r] if found else []


@dataclass
class RollCall:
    """Who is in this launch (host, local rank and pid of every process) and a host-side group to check it.

    Why: a collective that a dead or hung process never joins waits (under NCCL until the watchdog's timeout)
    and then fails without saying which process was missing. ``torch.distributed.monitored_barrier`` names
    the ranks that did not arrive, but works on gloo only; under NCCL the roll call opens one gloo group for
    these checks beside the training group. Single-process runs get a roll call whose checks do nothing.
    """

    timeout: timedelta
    group: Any = None  # the gloo group the checks run on (None: the world group, when it is gloo)
    processes: list[str] = field(default_factory=list)  # "host H (local rank L, pid P)" by global rank

    @classmethod
    def take(cls, timeout_s: float) -> "RollCall":
        """Collective: check that every process of the launch arrived, then learn where each one runs."""
        here = f"host {socket.gethostname()} (local rank {os.environ.get('LOCAL_RANK', 0)}, pid {os.getpid()})"
        timeout = timedelta(seconds=timeout_s)
        if not is_distributed():
            return cls(timeout, None, [here])
        gloo = "gloo" in str(dist.get_backend())  # also "cuda:nccl,cpu:gloo"
        call = cls(timeout, None if gloo else dist.new_group(backend="gloo", timeout=timeout))
        call.barrier("the start-up check")
        call.processes = [""] * dist.get_world_size()
        dist.all_gather_object(call.processes, here, group=call.group)
        return call

    def describe(self, ranks: Iterable[int]) -> str:
        """``rank 1 on host b (local rank 0, pid 4242)``, for each of ``ranks``."""
        known = len(self.processes)
        return ", ".join(f"rank {r}" + (f" on {self.processes[r]}" if r < known and self.processes[r] else "")
                         for r in ranks)

    def barrier(self, where: str) -> None:
        """Wait for every process; a :class:`RanksMissingError` naming the absent ones after ``timeout``."""
        if not is_distributed():
            return
        try:
            dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            raise RanksMissingError(self._absent_message(where, str(e))) from e

    def _absent_message(self, where: str, error: str) -> str:
        seconds = f"{self.timeout.total_seconds():g} s"
        hint = ("Every node must run the same command with the same --nnodes and rendezvous endpoint; look for "
                "an earlier error in the absent processes' logs, or raise --collective-timeout if one node's "
                "set-up is slow (e.g. a dataset on a slow file system).")
        if dist.get_rank() == 0:
            absent = missing_ranks(error)
            who = self.describe(absent) if absent else "some process"
            return f"{who} did not reach {where} within {seconds} (dead, hung, or never started). {hint}"
        return (f"{self.describe([dist.get_rank()])} reached {where}, but the main process, {self.describe([0])}, "
                f"did not confirm within {seconds} that every process did; rank 0's log names the absent ones. "
                f"{hint}")

    def check_shared_folder(self, folder: Path, wait_s: float = 5.0) -> None:
        """Collective: every process sees what the main process writes into ``folder``, or a
        :class:`SharedFolderError` naming the processes that do not.

        Why: checkpoints are written by the main process and read by every process on resume, so a
        multi-node run needs its output folder on a file system all nodes share. ``wait_s`` allows for
        network file systems whose directory listings lag behind another client's write.
        """
        if not is_distributed():
            return
        main = [uuid.uuid4().hex, str(folder)]  # rank 0's token and folder
        dist.broadcast_object_list(main, src=0, group=self.group)
        token, main_folder = main
        marker = Path(folder) / f".shared-folder-check-{token}"
        if dist.get_rank() == 0:
            marker.write_text(token)
        self.barrier("the shared-folder check")
        deadline = time.monotonic() + wait_s
        while not (seen := _holds(marker, token)) and time.monotonic() < deadline:
            time.sleep(0.2)
        flags: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(flags, seen, group=self.group)  # collective: everybody has looked
        if dist.get_rank() == 0:
            marker.unlink(missing_ok=True)
        self.barrier("the shared-folder check")  # the marker is gone for everybody when this returns
        blind = [r for r, ok in enumerate(flags) if not ok]
        if blind:
            raise SharedFolderError(
                f"the run folder {main_folder} is not shared: {self.describe(blind)} cannot see the files the main "
                f"process, {self.describe([0])}, writes there (or was given another --output-dir). Checkpoints are "
                f"written by the main process and read by every process on resume: give every node the same "
                f"--output-dir, on a file system they all mount at the same path (NFS, Lustre, ...).")


def _holds(marker: Path, token: str) -> bool:
    try:
        return marker.read_text() == token
    except OSError:
        return False
