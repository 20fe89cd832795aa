"""Training cost of a LocalModel: MACs, parameters, peak step memory and step time.

MACs are counted at the ATen dispatch level with ``torch.utils.flop_counter.FlopCounterMode``
(every conv / matmul that actually runs is counted, whatever module issued it); a MAC is half
a counted FLOP. Two totals, as in the paper's Table 2 and beyond it:

* ``gmacs``: backbone forward + every auxiliary *classifier* (``head.forward``);
* ``gmacs_train``: everything one training forward runs (``head.local_loss``), which adds
  e.g. InfoPro's decoder or PredSim's similarity conv.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:  # the pipeline cut counts MACs with this module, and model.py imports the engines
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


@contextlib.contextmanager
def _parameters_frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad while MACs are counted (and are restored after).

    FlopCounterMode's module tracker hooks the autograd graph of every module input that requires
    grad; a view of a parameter made under no_grad (a class token expanded to the batch, as CaiT
    passes it to its class-attention blocks) requires grad but has no graph, and the tracker fails
    on it. Counting never needs gradients.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def macs_per_sample(model: LocalModel, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, float]:
    """GMACs per sample: ``gmacs`` (backbone + aux classifiers) and ``gmacs_train``."""
    was_training = model.training
    model.eval()  # BatchNorm1d heads and batch statistics do not change MAC counts
    try:
        with _parameters_frozen(model):
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
    allocator's ``max_memory_allocated``. CPU: :class:`LiveStorageTracker` (live tensor
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
                "memory_method": "cuda.max_memory_allocated"}
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


def cost_report(
    model: LocalModel,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 64,
    memory: bool = False,
    timing: bool = False,
) -> dict[str, Any]:
    """MACs and parameters always; peak step memory and median step time on request."""
    if input_size is None:
        input_size = tuple(model.backbone.pretrained_cfg["input_size"])
    report: dict[str, Any] = {"input_size": list(input_size)}
    report.update(macs_per_sample(model, tuple(input_size)))
    report.update(parameter_counts(model))
    if memory or timing:
        device = next(model.parameters()).device
        x = torch.randn(batch_size, *input_size, device=device)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        report["batch_size"] = batch_size
        if memory:
            report.update(peak_step_memory(model, x, y))
        if timing:
            report["step_time_s"] = median_step_time(model, x, y)
    return report
