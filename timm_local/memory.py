"""The memory a process holds, as the operating system and CUDA see it.

Why this module exists: the live-tensor accounting (:class:`timm_local.cost.LiveStorageTracker`,
``torch.cuda.max_memory_allocated``) is what the tensors of a step need; what a user sees -- ``top``,
a cgroup limit, the OOM killer -- is the process's resident memory, which also holds what the memory
allocator keeps cached or cannot hand back (fragmentation). Local learning frees each block's
activations early, so on the CPU the allocator decides whether that saving shows up at all
(docs/memory.md). On CUDA the analogue is ``max_memory_reserved`` (the caching allocator's segments)
beside ``max_memory_allocated``.

Peak resident memory is the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), which
Linux lets a process reset (``/proc/self/clear_refs``), so a peak can be taken per epoch or per step
window; where that is not available the lifetime peak (``getrusage``) is reported instead.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import psutil
import torch

__all__ = ["CUDA_ALLOC_CONF_DEFAULT", "MiB", "PEAK_MEMORY_KEYS", "allocator_name", "cuda_alloc_conf",
           "default_cuda_alloc_conf", "format_bytes",
           "peak_memory_across_processes", "peak_memory_mb", "peak_rss_bytes", "reset_peak_memory", "reset_peak_rss",
           "rss_bytes"]

MiB = 2 ** 20
#: What the training entry point sets when the user has not configured CUDA's caching allocator: segments
#: that grow in place instead of a new segment per odd-sized block, so freed activations of one local
#: stage are reusable by the next one (PyTorch's "Optimizing memory usage" notes) -- reserved stays near
#: allocated.
CUDA_ALLOC_CONF_DEFAULT = "expandable_segments:True"
#: The fields :func:`peak_memory_mb` reports (training's train rows carry them: the epoch's peak so far).
PEAK_MEMORY_KEYS = ("peak_rss_mb", "peak_allocated_mb", "peak_reserved_mb")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(psutil.Process().memory_info().rss)


def _status_field(name: str) -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak_rss` (or since the process started)."""
    peak = _status_field("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current RSS; False where the OS offers no reset."""
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets VmHWM only (Documentation/filesystems/proc.rst)
        return True
    except OSError:
        return False


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Restart every peak this module reports: the process's RSS, and CUDA's when ``device`` is a GPU."""
    reset_peak_rss()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | str | None = None) -> dict[str, float]:
    """Peaks since :func:`reset_peak_memory`, in MiB: ``peak_rss_mb``; on CUDA also allocated / reserved."""
    out = {"peak_rss_mb": round(peak_rss_bytes() / MiB, 1)}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        out["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MiB, 1)
    return out


def peak_memory_across_processes(accelerator: Any) -> dict[str, float]:
    """:func:`peak_memory_mb` of every process of a launch, the largest per field (a collective).

    The busiest process is what a launch needs per device (a pipeline's segments differ).
    """
    local = peak_memory_mb(accelerator.device)
    if accelerator.num_processes == 1:
        return local
    values = torch.tensor(list(local.values()), dtype=torch.float64, device=accelerator.device)
    peaks = accelerator.gather(values).view(accelerator.num_processes, -1).amax(0)
    return dict(zip(local, (round(float(v), 1) for v in peaks.tolist())))


def allocator_name() -> str:
    """The host ``malloc`` this process runs on: ``tcmalloc``, ``jemalloc`` (preloaded) or ``glibc``/``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if sys.platform.startswith("linux") else "system"


def default_cuda_alloc_conf(environ: Any = os.environ) -> Optional[str]:
    """Set :data:`CUDA_ALLOC_CONF_DEFAULT` unless the user configured the allocator; the value now in force.

    Must run before the first CUDA allocation (the caching allocator reads its configuration once).
    ``PYTORCH_ALLOC_CONF`` is the newer name of ``PYTORCH_CUDA_ALLOC_CONF``; either one set by the user wins.
    """
    configured = cuda_alloc_conf(environ)
    if configured is not None:
        return configured
    environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF_DEFAULT
    return CUDA_ALLOC_CONF_DEFAULT


def cuda_alloc_conf(environ: Any = os.environ) -> Optional[str]:
    """The CUDA caching allocator's configuration in ``environ`` (either variable name), or None."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if environ.get(name):
            return environ[name]
    return None


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: for people; JSON keeps the exact numbers."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
