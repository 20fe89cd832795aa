"""Start W×R local processes in an initialised process group, for tests, benchmarks and CPU runs.

``torchrun`` / ``accelerate launch`` are the launchers for real training; this helper exists
so that a test or a benchmark can spawn its own workers on 127.0.0.1 (a free port found by
binding port 0), pin each to a number of threads and get each rank's return value back.
It uses the ``forkserver`` start method with ``timm_local`` preloaded, so each worker starts
by forking an already-imported interpreter instead of importing torch and timm again.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    threads: int,
    timeout_s: float,
    out_dir: str,
    args: Sequence[Any],
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
    )
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    threads_per_process: int = 1,
    timeout_s: float = 300.0,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes; return each rank's result.

    ``fn`` must be importable by reference (a module-level function). Inside it,
    ``torch.distributed`` is initialised (``backend``, ranks 0..world_size-1). A collective
    that waits longer than ``timeout_s`` raises instead of hanging, and an exception in any
    worker is re-raised here with its traceback.
    """
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(["timm_local"])
    with tempfile.TemporaryDirectory(prefix="timm_local_launch_") as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), backend, threads_per_process, timeout_s, out_dir, tuple(args)),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
