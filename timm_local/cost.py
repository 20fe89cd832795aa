"""Training cost of a LocalModel: MACs, parameters, peak step memory and step time.

MACs are counted at the ATen dispatch level with ``torch.utils.flop_counter.FlopCounterMode``
(every conv / matmul that actually runs is counted, whatever module issued it); a MAC is half
a counted FLOP. Two totals, as in the paper's Table 2 and beyond it:

* ``gmacs``: backbone forward + every auxiliary *classifier* (``head.forward``);
* ``gmacs_train``: everything one training forward runs (``head.local_loss``), which adds
  e.g. InfoPro's decoder or PredSim's similarity conv.

Peak memory comes in two figures (docs/memory.md): the *live* peak (:func:`peak_step_memory`: what the
step's tensors need, in this process) and the *process-level* peak
(:func:`timm_local.process_cost.process_step_memory`: what a fresh process running SGD steps holds above
its resident memory before the first step -- what a user sees, including what the memory allocator
keeps or cannot return).
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
import weakref
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .macs import count_macs
from .memory import allocator_name, cuda_alloc_conf

if TYPE_CHECKING:  # model.py imports the engines and the methods, which count MACs with .macs
    from .model import LocalModel


def _stage_inputs(model: LocalModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Output of each stage's last block (what its head sees)."""
    outputs = []
    h = x
    for stage in model.stages:
        for index in stage.blocks:
            h = model.partition.blocks[index](h)
        outputs.append(h)
    return outputs


def _cascade_path(model: LocalModel, j: int, features: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
    """The second path of cascade stage ``j`` (engine/stage.py): stage j-1's blocks run again from their
    input, then stage j's, then its cascade loss (or the network's top)."""
    h = features[j - 2] if j >= 2 else x
    for index in model.stages[j - 1].blocks + model.stages[j].blocks:
        h = model.partition.blocks[index](h)
    stage = model.stages[j]
    return model.partition.top(h) if stage.head is None else stage.head.cascade_loss(h, y, x)


@torch.no_grad()
def macs_per_sample(model: LocalModel, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, float]:
    """GMACs per sample: ``gmacs`` (backbone + aux classifiers) and ``gmacs_train``."""
    was_training = model.training
    model.eval()  # BatchNorm1d heads and batch statistics do not change MAC counts
    try:
        device = next(model.parameters()).device
        x = torch.randn(batch_size, *input_size, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device)
        backbone = count_macs(lambda: model.backbone(x), model)
        features = _stage_inputs(model, x)
        heads = [(s.head, h) for s, h in zip(model.stages, features) if s.head is not None]
        classifiers = sum(count_macs(lambda: head(h), model) for head, h in heads)
        train_extra = sum(count_macs(lambda: head.local_loss(h, y, x), model) for head, h in heads)
        train_extra += sum(count_macs(lambda: _cascade_path(model, j, features, x, y), model)
                           for j, stage in enumerate(model.stages) if stage.cascade is not None)
    finally:
        model.train(was_training)
    return {
        "gmacs": (backbone + classifiers) / batch_size / 1e9,
        "gmacs_train": (backbone + train_extra) / batch_size / 1e9,
        "gmacs_backbone": backbone / batch_size / 1e9,
    }


def parameter_counts(model: LocalModel) -> dict[str, int]:
    return {
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "aux_params": sum(p.numel() for p in model.heads.parameters()),
    }


def _training_step(model: LocalModel, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.local_step(x, y)


class LiveStorageTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive.

    Every ATen op's outputs are seen at dispatch; a storage is counted once when first seen
    and uncounted by a finalizer when it is freed (PyTorch keeps one Python object per live
    storage, so the finalizer fires exactly at the free). This is what the CPU allocator would
    report as live tensor memory, without fragmentation or caching.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Storages alive before the step (parameters, buffers, the batch) must not be counted
        # when an op returns a view of them (aten.t of a Linear weight, aten.detach of the input).
        for t in existing:
            self._seen[t.untyped_storage()] = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    weakref.finalize(storage, self._release, nbytes)
                    self.peak = max(self.peak, self.live)
        return out


def peak_step_memory(model: LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Peak memory allocated *during* one training step above what was live before it.

    Gradients are set to None first, so their allocation is counted. CUDA: the caching
    allocator's ``max_memory_allocated`` and, beside it, ``max_memory_reserved`` above the same
    baseline (what the caching allocator holds for the step, warm-up included). CPU: :class:`LiveStorageTracker` (live tensor
    storages, counted at dispatch) — the same quantity, without allocator caching.
    """
    model.train()
    _training_step(model, x, y)  # warm-up: lazy allocations (e.g. cuDNN workspaces)
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model.local_step(x, y)
        torch.cuda.synchronize()
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated() - before,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved() - before,
                "memory_method": "cuda.max_memory_allocated (reserved: cuda.max_memory_reserved)"}
    tracker = LiveStorageTracker(existing=(*model.parameters(), *model.buffers(), x, y))
    with tracker:
        model.local_step(x, y)
    return {"peak_memory_bytes": int(tracker.peak), "memory_method": "live tensor storages at dispatch (CPU)"}


def median_step_time(model: LocalModel, x: torch.Tensor, y: torch.Tensor, steps: int = 5, warmup: int = 2) -> float:
    model.train()
    times = []
    for i in range(warmup + steps):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _training_step(model, x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


PROFILE_GROUPS = (
    ("convolution", ("conv",)),
    ("batch norm", ("batch_norm",)),
    ("linear / matmul", ("addmm", "aten::mm", "matmul", "bmm")),
    ("pooling", ("pool", "aten::mean", "aten::div", "aten::sum")),
    ("copies", ("copy_", "contiguous", "clone")),
    ("relu / add / other elementwise", ("relu", "threshold", "clamp", "add", "mul")),
)


def profile_step(model: LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Self time (s) of one training step's ATen ops, by group: where the time goes.

    CPU: self CPU time; CUDA: self device (kernel) time. Ops outside the groups are "other";
    "framework" is the rest of the profiled step (Python, autograd engine, dispatch).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    median_step_time(model, x, y, steps=1, warmup=0)
    with profile(activities=activities) as prof:
        start = time.process_time()  # CPU time: what this process did, not what the machine's tenants did
        median_step_time(model, x, y, steps=1, warmup=0)
        total = time.process_time() - start
    groups = {name: 0.0 for name, _ in PROFILE_GROUPS} | {"other ops": 0.0}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        us = getattr(event, "self_device_time_total", 0.0) if cuda else event.self_cpu_time_total
        group = next((g for g, keys in PROFILE_GROUPS if any(k in event.key for k in keys)), "other ops")
        groups[group] += us / 1e6
    if not cuda:
        groups["framework"] = max(0.0, total - sum(groups.values()))
    return {k: round(v, 4) for k, v in groups.items()}


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Enough to interpret measured numbers: CPU, threads, load, allocator, torch/timm versions, GPU."""
    import timm

    from .version import __version__

    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "allocator": allocator_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "timm_local": __version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["cuda_alloc_conf"] = cuda_alloc_conf()
    return info
