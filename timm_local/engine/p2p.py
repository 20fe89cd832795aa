"""The wire format between neighbouring pipeline segments: (activation, target, input) messages.

A message is a fixed-size header (dtype and shape of each field, so the receiver can allocate:
batch sizes may vary) followed by the fields that are present, over torch.distributed
point-to-point operations (``isend``/``irecv``: gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["ActivationLink"]

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_MAX_DIMS = 8
_SLOT = 2 + _MAX_DIMS  # dtype code (-1 = absent), ndim, dims
_FIELDS = 3  # activation, target, network input
_HEADER_LEN = _FIELDS * _SLOT


def _encode_header(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Dtypes and shapes of a message, so the receiver can allocate (batch sizes may vary)."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    for i, t in enumerate(tensors):
        slot = header[i * _SLOT:(i + 1) * _SLOT]
        if t is None:
            slot[0] = -1
            continue
        if t.dtype not in _DTYPES or t.ndim > _MAX_DIMS:
            raise TypeError(f"cannot pipeline a tensor of dtype {t.dtype} with {t.ndim} dims")
        slot[0] = _DTYPES.index(t.dtype)
        slot[1] = t.ndim
        slot[2:2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def _decode_header(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]] | None]:
    values = header.tolist()
    meta: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    for i in range(_FIELDS):
        code, ndim, *dims = values[i * _SLOT:(i + 1) * _SLOT]
        meta.append(None if code < 0 else (_DTYPES[code], tuple(dims[:ndim])))
    return meta


class ActivationLink:
    """Messages (activation, target, input) to or from one neighbouring rank.

    Order of posting equals order of sending on both sides (header, then the present fields),
    which NCCL needs (it matches point-to-point operations by order, not by tag); gloo gets a
    tag per field on top. A send keeps its buffers alive until the next send or ``wait``,
    which also bounds how far an upstream segment can run ahead: one batch in flight.
    """

    def __init__(self, peer: int, device: torch.device, comm_device: torch.device) -> None:
        self.peer = peer
        self.device = device
        self.comm_device = comm_device
        self._works: list[Any] = []
        self._buffers: list[torch.Tensor] = []

    def send(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self.wait()
        header = _encode_header(tensors).to(self.comm_device)
        buffers = [header]
        works = [dist.isend(header, self.peer, tag=0)]
        for field, t in enumerate(tensors):
            if t is None:
                continue
            # Heads must not modify their input in place (the sequential engine relies on this
            # too: the next block reads the same storage), so no defensive copy is needed here.
            payload = t.detach().to(self.comm_device).contiguous()
            buffers.append(payload)
            works.append(dist.isend(payload, self.peer, tag=1 + field))
        self._works, self._buffers = works, buffers

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], []

    def recv(self) -> list[torch.Tensor | None]:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.comm_device)
        dist.irecv(header, self.peer, tag=0).wait()
        received: list[torch.Tensor | None] = []
        works = []
        for field, meta in enumerate(_decode_header(header.cpu())):
            if meta is None:
                received.append(None)
                continue
            dtype, shape = meta
            buffer = torch.empty(shape, dtype=dtype, device=self.comm_device)
            works.append(dist.irecv(buffer, self.peer, tag=1 + field))
            received.append(buffer)
        for work in works:
            work.wait()
        return [None if t is None else t.to(self.device) for t in received]


