"""End-to-end backprop with per-block activation checkpointing: the memory baseline of Table 2.

Gradients are those of ``bp`` exactly; only block outputs are kept in the forward pass and
each block's internals are recomputed during backward (the engine does this for a stage with
``checkpoint=True``), trading about one extra forward for memory.
"""
from __future__ import annotations

from ..partition import Partition
from .base import LocalMethod, LocalStage, register_method, single_stage_for_all


@register_method("checkpoint")
class GradientCheckpointing(LocalMethod):
    """BP + gradient checkpointing, one checkpoint per local block."""

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        return single_stage_for_all(partition, checkpoint=True)
