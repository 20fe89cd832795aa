"""Make every pipeline rank hold the complete trained state: model tensors and optimizer state.

Each segment trains only its own tensors, so after training the model on any one rank is partly
stale. Broadcasting each tensor (and each parameter's optimizer state) from its owner in replica 0
makes every rank hold exactly what the sequential engine would hold, so evaluation, checkpoints and
export can run the sequential engine's code unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..distributed import broadcast_tensors
from .topology import PipelineTopology

__all__ = ["broadcast_from_owners", "merge_optimizer_state"]


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Accelerate wraps optimizers; the state lives in the wrapped ``torch.optim.Optimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def broadcast_from_owners(tensors_by_segment: Sequence[Sequence[torch.Tensor]], topology: PipelineTopology,
                          comm_device: torch.device) -> None:
    """Collective: overwrite segment s's tensors on every rank with those of segment s in replica 0."""
    for s, tensors in enumerate(tensors_by_segment):
        broadcast_tensors(list(tensors), topology.rank_of(s, 0), comm_device)


def merge_optimizer_state(optimizer: Any, model: nn.Module, names_by_segment: Sequence[set[str]],
                          topology: PipelineTopology) -> None:
    """Collective: every rank's ``optimizer`` gets each parameter's state from its owning segment.

    The optimizer must index parameters by ``model.named_parameters()`` (any subset, any order: state
    is matched by name), so the result equals the sequential engine's optimizer state.
    """
    optimizer = _unwrap_optimizer(optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    merged: dict[str, dict[str, Any]] = {}
    for s, owned in enumerate(names_by_segment):
        src = topology.rank_of(s, 0)
        box: list[Any] = [None]
        if topology.rank == src:
            box[0] = {
                name_of[id(p)]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                for p in params
                if p in optimizer.state and name_of.get(id(p)) in owned
            }
        dist.broadcast_object_list(box, src=src)
        merged.update(box[0])
    state = optimizer.state_dict()
    index_of = {name_of[id(p)]: i for i, p in enumerate(params) if id(p) in name_of}
    state["state"] = {index_of[name]: value for name, value in merged.items() if name in index_of}
    optimizer.load_state_dict(state)
