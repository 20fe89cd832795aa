"""Which pipeline segment and replica each process runs.

``world_size = W × R`` processes; global rank ``r·W + s`` runs segment ``s`` of replica ``r``
(consecutive ranks form one pipeline, so on a multi-GPU node a pipeline's neighbours are
neighbouring GPUs, and on several nodes a pipeline spans as few nodes as possible).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["PipelineTopology", "require_process_group"]


def require_process_group() -> None:
    """Refuse to start without torch.distributed: every collective of the pipeline needs it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the pipeline engine needs an initialised torch.distributed process group: launch with "
            "`torchrun --nproc_per_node W×R` or `accelerate launch --num_processes W×R`, or use "
            "timm_local.engine.launch_local on one machine"
        )


@dataclass(frozen=True)
class PipelineTopology:
    """Which segment and replica a rank runs: ``rank = replica · W + segment``."""

    world_size: int
    num_segments: int  # W
    rank: int

    @classmethod
    def create(cls, world_size: int, rank: int, num_segments: int) -> "PipelineTopology":
        if num_segments < 1:
            raise ValueError(f"the number of pipeline stages W must be >= 1, got {num_segments}")
        if world_size % num_segments:
            raise ValueError(
                f"world size {world_size} is not divisible by the number of pipeline stages W={num_segments}: "
                f"launch W×R processes (R data-parallel replicas of a W-stage pipeline), e.g. "
                f"--nproc_per_node {num_segments} or {2 * num_segments}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        return cls(world_size, num_segments, rank)

    @property
    def num_replicas(self) -> int:
        """R: how many copies of the pipeline run on different data."""
        return self.world_size // self.num_segments

    @property
    def segment(self) -> int:
        return self.rank % self.num_segments

    @property
    def replica(self) -> int:
        return self.rank // self.num_segments

    def rank_of(self, segment: int, replica: int) -> int:
        return replica * self.num_segments + segment

    @property
    def is_first(self) -> bool:
        """This rank feeds data into its replica's pipeline."""
        return self.segment == 0

    @property
    def is_last(self) -> bool:
        """This rank runs the network's top and its loss (it holds the logits)."""
        return self.segment == self.num_segments - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def replica_group_ranks(self, segment: int) -> list[int]:
        """Ranks that run ``segment`` in every replica (they all-reduce its gradients)."""
        return [self.rank_of(segment, r) for r in range(self.num_replicas)]

    def replica_process_group(self, timeout: timedelta | None = None) -> Any:
        """The process group that averages this rank's segment's gradients over the replicas (None for R = 1).

        Every rank must create every replica group, in the same order (torch.distributed's rule), so each
        rank builds all W of them and keeps its own.
        """
        own = None
        if self.num_replicas > 1:
            for segment in range(self.num_segments):
                group = dist.new_group(self.replica_group_ranks(segment), timeout=timeout)
                if segment == self.segment:
                    own = group
        return own
