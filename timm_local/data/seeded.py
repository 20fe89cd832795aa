"""Augmentation as a pure function of (seed, epoch, sample index).

Each sample's transform runs under its own seeded RNG, so a resumed run -- even one resumed mid-epoch,
or with a different number of loader workers -- sees exactly the same augmented images as an
uninterrupted one, and augmentation never perturbs the training RNG stream.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset

from .sources import ImageSource

__all__ = ["SeededTransformDataset", "isolated_rng"]


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block under torch/python RNGs seeded with ``seed``, restoring the outer states afterwards.

    torchvision transforms draw from torch's global RNG and timm's from python's ``random``; isolating
    them makes augmentation independent of worker count, resume position, and the training RNG.
    """
    torch_state = torch.random.get_rng_state()
    py_state = random.getstate()
    torch.random.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(py_state)


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``source[i]`` with an RNG seeded by ``(seed, epoch, i)``.

    Call :meth:`set_epoch` before each epoch (the training loop does) so that epochs differ. The epoch
    lives in shared memory, so loader workers that persist across epochs (``persistent_workers``: no
    re-spawn and re-import per epoch) see the new value too.
    """

    def __init__(self, source: ImageSource, transform: Callable, seed: int = 0, epoch: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.shared_epoch = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.source)

    def sample_seed(self, index: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.source[index]
        with isolated_rng(self.sample_seed(index)):
            return self.transform(img), label
