"""Counting multiply-accumulates: a leaf both the cost report and the methods' module split use.

MACs are counted at the ATen dispatch level with ``torch.utils.flop_counter.FlopCounterMode`` (every conv
/ matmul that actually runs is counted, whatever module issued it); a MAC is half a counted FLOP.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "parameters_frozen"]


def count_macs(fn: Callable[[], Any], module: torch.nn.Module | None = None) -> int:
    """Multiply-accumulates of everything ``fn`` runs (FLOPs / 2 as counted by PyTorch).

    ``module``: the model ``fn`` runs, whose parameters stop requiring grad while counting (see
    :func:`parameters_frozen`: without it some models, e.g. CaiT, cannot be counted at all).
    """
    counter = FlopCounterMode(display=False)
    with parameters_frozen(module) if module is not None else contextlib.nullcontext(), counter:
        fn()
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def parameters_frozen(module: torch.nn.Module) -> Iterator[None]:
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
