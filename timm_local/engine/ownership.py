"""Which local stage trains each tensor of a LocalModel: what a pipeline segment owns.

A pipeline segment updates, checkpoints and broadcasts exactly the tensors of its local stages, so
the assignment must be a partition: every parameter and buffer belongs to one local stage.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from ..methods.base import LocalHead

if TYPE_CHECKING:  # model.py imports the engines, so engines import it only for types
    from ..model import LocalModel

__all__ = ["needs_inputs", "refuse_cross_segment_reads", "tensors_by_local_stage"]


def tensors_by_local_stage(model: LocalModel) -> list[list[tuple[str, torch.Tensor]]]:
    """Every entry of ``model.state_dict()`` assigned to the local stage that trains it.

    A stage owns its primary blocks and its head; the last stage (head=None) also owns the
    backbone tensors outside every block, i.e. the network's top (pooling, classifier) that
    runs there. A tensor shared by two stages cannot be split across processes: error.
    """
    stages = model.stages
    if not stages or stages[-1].head is not None:
        raise ValueError("a method's last local stage must use the network's own top (head=None)")
    owner: dict[int, int] = {}

    def claim(module: nn.Module, j: int) -> None:
        for t in itertools.chain(module.parameters(), module.buffers()):
            previous = owner.setdefault(id(t), j)
            if previous != j:
                raise ValueError(
                    f"a tensor is shared by local stages {previous} and {j}; the pipeline engine needs "
                    "each parameter and buffer to belong to exactly one local stage"
                )

    for j, stage in enumerate(stages):
        for index in stage.blocks:
            claim(model.partition.blocks[index], j)
        if stage.head is not None:
            claim(stage.head, j)
    owned: list[list[tuple[str, torch.Tensor]]] = [[] for _ in stages]
    for name, t in model.state_dict(keep_vars=True).items():
        j = owner.get(id(t))
        if j is None:
            if not name.startswith("backbone."):
                raise ValueError(f"state entry {name!r} belongs to no local stage")
            j = len(stages) - 1  # the network's top runs in the last stage
        owned[j].append((name, t))
    return owned


def needs_inputs(head: LocalHead | None) -> bool:
    """Whether a head's loss may read the network input (InfoPro's reconstruction does).

    The default :meth:`LocalHead.local_loss` ignores it; any override is assumed to need it.
    """
    return head is not None and type(head).local_loss is not LocalHead.local_loss


def refuse_cross_segment_reads(model: LocalModel, segments: Sequence[range]) -> None:
    """Refuse a cut that puts a head apart from a primary block it reads the weights of, and cascade
    stages (whose loss trains the previous stage's blocks too, after that stage's gradients were handed
    to the replica average).

    A head's ``reads_blocks`` (MAN's momentum copies follow the next module's first block) are read on
    the rank that runs the head; a block another segment trains is only current there after a
    consolidation, so such a cut would silently follow stale weights.
    """
    cascades = [j for j, stage in enumerate(model.stages) if stage.cascade is not None]
    if cascades:
        raise ValueError(
            f"{model.method_name}'s local stage {cascades[0]} reaches back into stage {cascades[0] - 1} (its cascade "
            "loss trains both), which the pipeline's per-stage ownership and gradient averaging cannot express; "
            "train this method with the sequential engine (--engine sequential)")
    segment_of = {j: s for s, stages in enumerate(segments) for j in stages}
    block_stage = {b: j for j, stage in enumerate(model.stages) for b in stage.blocks}
    for j, stage in enumerate(model.stages):
        for block in getattr(stage.head, "reads_blocks", ()):
            if segment_of[block_stage[block]] != segment_of[j]:
                raise ValueError(
                    f"{model.method_name}'s head of local stage {j} follows the weights of block "
                    f"{model.partition.names[block]!r}, which another pipeline segment trains; cut the pipeline "
                    f"(cut=...) so that local stages {j} and {block_stage[block]} share a segment, or use the "
                    "sequential engine")
