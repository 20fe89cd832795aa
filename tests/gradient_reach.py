"""Which local stages each local loss trains, measured on the engine's own step (shared by the detach tests)."""
from __future__ import annotations

import torch

import timm_local
from timm_local.engine import sequential_local_step


def stages_reached(model: timm_local.LocalModel, x: torch.Tensor, y: torch.Tensor) -> list[set[int]]:
    """For each backward of one sequential step, the stages whose parameters got a non-zero gradient
    (a stage owns its blocks and its head; the last stage also the network's classifier)."""
    owner = {}
    for j, stage in enumerate(model.stages):
        for index in stage.blocks:
            owner.update({id(p): j for p in model.partition.blocks[index].parameters()})
        module = stage.head if stage.head is not None else model.backbone.get_classifier()
        owner.update({id(p): j for p in module.parameters()})
    reached: list[set[int]] = []

    def backward(loss: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        loss.backward()
        reached.append({owner[id(p)] for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0})

    sequential_local_step(model.partition, model.stages, x, y, backward)
    return reached
