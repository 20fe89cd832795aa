"""Process-level cost of a training step: what a fresh process running SGD steps holds, and its step time.

The live-tensor peak (:func:`timm_local.cost.peak_step_memory`) says what a step's tensors need; the
figure a user sees is the process's resident memory (docs/memory.md), which also holds what the
allocator keeps cached or cannot return. It must be taken in a *fresh* process: a process that has
already run other models holds their freed-but-kept memory, which the next model would reuse.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .cost import peak_step_memory
from .engine.speed import compile_blocks_and_heads, use_channels_last
from .memory import allocator_name, peak_rss_bytes, reset_peak_memory, rss_bytes
from .model import LocalModel, create_local_model

__all__ = ["AUTOCAST_DTYPES", "StepCase", "measure_step_case", "process_step_memory"]

#: ``StepCase.autocast`` -> the dtype of ``torch.autocast`` (None: full precision).
AUTOCAST_DTYPES: dict[Optional[str], Optional[torch.dtype]] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepCase:
    """One model + method + batch to measure in a fresh process (picklable: it crosses the process boundary).

    ``method_kwargs`` are the method's hyper-parameters (e.g. ``{"aux_depth": 2}``); ``input_size`` None
    means the model's ``pretrained_cfg`` size. ``threads`` 0 keeps torch's default.
    """

    model: str
    method: str
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    input_size: Optional[tuple[int, int, int]] = None
    batch_size: int = 64
    steps: int = 3
    warmup: int = 1
    threads: int = 0
    device: str = "cpu"
    channels_last: bool = False
    torchcompile: Optional[str] = None
    autocast: Optional[str] = None  # a key of AUTOCAST_DTYPES: mixed precision of the local step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={self.autocast!r}: use one of {[k for k in AUTOCAST_DTYPES if k]} or None")

    def build(self) -> LocalModel:
        """The case's LocalModel on its device, with its speed options applied."""
        torch.manual_seed(self.seed)
        timm_kwargs: dict[str, Any] = {"num_classes": self.num_classes}
        if self.input_size is not None:
            timm_kwargs["pretrained_cfg_overlay"] = dict(input_size=tuple(self.input_size))
        model = create_local_model(self.model, self.method, input_size=self.input_size,
                                   method_kwargs=dict(self.method_kwargs), **timm_kwargs).to(self.device).train()
        if self.channels_last:
            use_channels_last(model)
        if self.torchcompile:
            compile_blocks_and_heads(model, backend=self.torchcompile)
        return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_case(case: StepCase, live: bool = True) -> dict[str, Any]:
    """Peak memory and time of SGD steps (``local_step`` + ``optimizer.step()``) of ``case``, in *this* process.

    Call it in a fresh process (:func:`process_step_memory` does): the process-level figure is the peak
    resident memory over the warm-up and timed steps minus the resident memory before the first step
    (model and optimizer built, batch allocated), so it holds the activations, gradients, optimizer
    state and whatever the allocator keeps. CUDA: the same with ``max_memory_reserved`` and
    ``max_memory_allocated`` above the allocated memory before the first step. ``live`` adds the
    live-tensor peak of one more step (:func:`peak_step_memory`), measured after the peaks are read.
    """
    if case.threads:
        torch.set_num_threads(case.threads)
    model = case.build()
    device = next(model.parameters()).device
    size = tuple(case.input_size or model.backbone.pretrained_cfg["input_size"])
    x = torch.randn(case.batch_size, *size, device=device)
    y = torch.randint(0, model.num_classes, (case.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sync(device)
    before = rss_bytes()
    reset_peak_memory(device)
    if device.type == "cuda":
        allocated_before = torch.cuda.memory_allocated(device)
    dtype = AUTOCAST_DTYPES[case.autocast]
    wall, cpu, warmup = [], [], []
    for i in range(case.warmup + case.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model.local_step(x, y)
        optimizer.step()
        _sync(device)
        if i >= case.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        else:  # lazy initialisation; with torchcompile, the compilation
            warmup.append(round(time.perf_counter() - start, 3))
    peak = peak_rss_bytes()
    report: dict[str, Any] = {
        "rss_before_step_bytes": before, "peak_rss_bytes": peak, "process_peak_memory_bytes": max(0, peak - before),
        "step_wall_s": [round(t, 5) for t in wall], "step_cpu_s": [round(t, 5) for t in cpu],
        "step_time_s": round(statistics.median(wall), 5), "warmup_wall_s": warmup, "allocator": allocator_name(),
        "threads": torch.get_num_threads(),
        "process_memory_method": "peak RSS (VmHWM) of a fresh process minus its RSS before the first step",
    }
    if device.type == "cuda":
        report["process_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) - allocated_before
        report["process_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) - allocated_before
        report["process_memory_method"] += "; CUDA: max_memory_reserved / max_memory_allocated above allocated before"
    if live:
        report.update(peak_step_memory(model, x, y))
    return report


def process_step_memory(case: StepCase, live: bool = True) -> dict[str, Any]:
    """:func:`measure_step_case` in a fresh interpreter (``spawn``): nothing this process allocated counts.

    The child inherits the environment, so a process launched with tcmalloc (docs/memory.md) measures
    tcmalloc; its ``allocator`` field says which ``malloc`` it ran on.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_step_case, case, live).result()
