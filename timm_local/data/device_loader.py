"""Feeding a GPU: uint8 batches from the workers, copied asynchronously, normalised on the device.

timm's recipe (``timm.data.loader.PrefetchLoader``, from NVIDIA's APEX example): workers hand over uint8
images (a quarter of float32's bytes through the worker queues, the pinned buffers and the PCIe copy), the
copy of batch i+1 runs on a side CUDA stream while the model works on batch i, and the float conversion
and normalisation are GPU kernels instead of a worker's CPU time.

Why not timm's class itself: it normalises as ``(x - 255 mean) / (255 std)``, which differs in the last bit
from torchvision's ``ToTensor`` + ``Normalize`` (``(x / 255 - mean) / std``) that the CPU path uses; the
arithmetic here is torchvision's, so a run gives the same batches bit for bit whichever path it takes
(a resume may switch between them), and a checkpoint written on one resumes exactly on the other.
Random erasing, the one augmentation timm applies on the device, is in none of the paper's recipes.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterator, Sequence

import torch

__all__ = ["DeviceBatches", "normalize_batch"]


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` of a uint8 ``(N, C, H, W)`` batch, as torchvision computes it per image."""
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)


class DeviceBatches:
    """Iterate ``loader``'s ``(uint8 images, labels)`` as normalised float32 images on ``device``.

    Batches already on the device (Accelerate's prepared loaders move them) are only normalised, in step;
    others are copied with ``non_blocking=True`` (from pinned memory, an asynchronous copy), on a side
    stream on CUDA, one batch ahead. ``normalize=False``: batches the workers normalised, only moved.
    ``set_epoch``, ``len`` and the loader's other attributes pass through.
    """

    def __init__(self, loader: Any, mean: Sequence[float], std: Sequence[float], device: Any,
                 normalize: bool = True) -> None:
        self.loader, self.normalize = loader, normalize
        self.device = torch.device(device)
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self.stream = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, set_epoch, ... of the wrapped loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _ready(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, Any]:
        x = x.to(self.device, non_blocking=True)
        if isinstance(y, torch.Tensor):
            y = y.to(self.device, non_blocking=True)
        return (normalize_batch(x, self.mean, self.std) if self.normalize else x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        cuda = self.device.type == "cuda"
        if cuda and self.stream is None:
            # one stream for the loader's lifetime: the caching allocator pools blocks per stream
            self.stream = torch.cuda.Stream(device=self.device)
        pending = None
        for x, y in self.loader:
            if x.device == self.device:
                # placed by Accelerate, which reads one batch ahead itself and tracks the end of the loader for
                # gather_for_metrics: normalise in step with it, never a batch ahead
                yield self._ready(x, y)
                continue
            if cuda:
                consumer = torch.cuda.current_stream(self.device)
                self.stream.wait_stream(consumer)  # blocks the consumer freed may be reused by the copy below
            with torch.cuda.stream(self.stream) if cuda else nullcontext():
                ready = self._ready(x, y)
            if pending is not None:
                yield pending
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            pending = ready
        if pending is not None:
            yield pending
