"""A distributed sampler that resumes mid-epoch by dropping indices, not batches.

Why: skipping consumed batches by iterating the loader (``itertools.islice``) reads and decodes every
skipped image -- at ImageNet scale, minutes of a resumed run spent re-decoding what was already trained on.
Dropping the first indices of the (seed, epoch) order gives exactly the remaining batches, unread.
"""
from __future__ import annotations

import itertools
from typing import Iterator

from torch.utils.data import DistributedSampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch starts after ``skip`` of its indices (set before each epoch;
    a multiple of the per-process batch, so the remaining batches are the uninterrupted run's)."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)
