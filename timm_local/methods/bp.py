"""End-to-end backpropagation, the reference every local rule is compared with."""
from __future__ import annotations

from ..partition import Partition
from .base import LocalMethod, LocalStage, register_method, single_stage_for_all


@register_method("bp")
class BackProp(LocalMethod):
    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        return single_stage_for_all(partition)
