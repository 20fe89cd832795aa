"""Training cost of a LocalModel: MACs, parameters, peak step memory and step time.

MACs are counted at the ATen dispatch level with ``torch.utils.flop_counter.FlopCounterMode``
(every conv / matmul that actually runs is counted, whatever module issued it); a MAC is half
a counted FLOP. Two totals, as in the paper's Table 2 and beyond it:

* ``gmacs``: backbone forward + every auxiliary *classifier* (``head.forward``);
* ``gmacs_train``: everything one training forward runs (``head.local_loss``), which adds
  e.g. InfoPro's decoder or PredSim's similarity conv.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import LocalModel


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of everything ``fn`` runs (FLOPs / 2 as counted by PyTorch)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() // 2


def _stage_inputs(model: LocalModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Output of each stage's last block (what its head sees)."""
    outputs = []
    h = x
    for stage in model.stages:
        for index in stage.blocks:
            h = model.partition.blocks[index](h)
        outputs.append(h)
    return outputs


@torch.no_grad()
def macs_per_sample(model: LocalModel, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, float]:
    """GMACs per sample: ``gmacs`` (backbone + aux classifiers) and ``gmacs_train``."""
    was_training = model.training
    model.eval()  # BatchNorm1d heads and batch statistics do not change MAC counts
    try:
        device = next(model.parameters()).device
        x = torch.randn(batch_size, *input_size, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device)
        backbone = count_macs(lambda: model.backbone(x))
        features = _stage_inputs(model, x)
        heads = [(s.head, h) for s, h in zip(model.stages, features) if s.head is not None]
        classifiers = sum(count_macs(lambda: head(h)) for head, h in heads)
        train_extra = sum(count_macs(lambda: head.local_loss(h, y, x)) for head, h in heads)
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


def peak_step_memory(model: LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Peak memory allocated *during* one training step above what was live before it.

    Gradients are set to None first, so their allocation is counted. CUDA: the caching
    allocator's ``max_memory_allocated``. CPU: the CPU allocator's allocation/free events as
    recorded by ``torch.profiler`` (``profile_memory=True``), accumulated in time order: the
    same quantity, measured at the allocator, excluding fragmentation.
    """
    model.train()
    _training_step(model, x, y)  # warm-up: lazy allocations (e.g. cuDNN workspaces)
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _training_step(model, x, y)
        torch.cuda.synchronize()
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated() - before,
                "memory_method": "cuda.max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _training_step(model, x, y)
    events = [e for e in prof.events() if e.name == "[memory]"]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return {"peak_memory_bytes": int(peak), "memory_method": "torch.profiler CPU allocator events"}


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
