"""What the partition and the family adapters share: the measured block spec and the probe run.

A leaf: it imports nothing of the project, so the families can name a block's spec and run
the probe without importing :mod:`timm_local.partition`, which imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

__all__ = ["LAYOUTS", "BlockSpec", "PartitionView", "first_line", "run_on_probe"]

#: Feature layouts a local block may output: feature maps (batch, channels, height, width), channels-last
#: maps (batch, height, width, channels) as Swin-style models keep them, and tokens (batch, tokens, channels).
LAYOUTS = ("NCHW", "NHWC", "NLC")


@dataclass(frozen=True)
class BlockSpec:
    """What methods need to know about primary block ``index`` (never its weights).

    ``out_chs`` is the channel (embedding) width in every layout. ``reduction`` is the output stride
    relative to the input image (spatial size = input / reduction); for tokens it is the patch size
    the token count implies. ``shape`` is the measured output shape without the batch dimension.
    """

    index: int
    name: str
    out_chs: int
    reduction: int
    layout: str = "NCHW"
    shape: tuple[int, ...] = ()


class PartitionView(Protocol):
    """What an adapter reads of a :class:`~timm_local.partition.Partition` to build a copy.

    (A protocol, so the adapters need not import the partition module that imports them.)
    """

    model: nn.Module
    blocks: list[nn.Module]
    specs: list[BlockSpec]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for a one-line error that names it ("" if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def run_on_probe(model: nn.Module, x: torch.Tensor, what: str, fn: Callable[..., Any], *args: object) -> Any:
    """``fn(*args)`` on the probe; a failure inside the model becomes an error naming the input size.

    (An architecture with a fixed or constrained input size fails deep inside timm otherwise.)
    """
    try:
        return fn(*args)
    except Exception as e:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        own = tuple(cfg.get("input_size", ()))
        raise ValueError(
            f"{type(model).__name__} cannot run {what} on inputs of shape {tuple(x.shape[1:])} "
            f"({type(e).__name__}: {first_line(e)}); pass input_size= a size the model accepts"
            + (f", e.g. its own {own}" if own else "")
        ) from e

