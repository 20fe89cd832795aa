"""SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` (torchvision's reader; needs scipy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sources import ImageSplits, TorchvisionSource
from .presence import presence_only

__all__ = ["read_svhn"]


def read_svhn(root: Path) -> Optional[ImageSplits]:
    """The two .mat files in ``root`` (or ``root/svhn``, ``root/SVHN``), else None."""
    from torchvision.datasets import SVHN

    for parent in (root, root / "svhn", root / "SVHN"):
        if (parent / "train_32x32.mat").is_file() and (parent / "test_32x32.mat").is_file():
            cls = presence_only(SVHN, split_list={k: [u, f, None] for k, (u, f, _) in SVHN.split_list.items()})
            try:
                train, test = cls(str(parent), split="train"), cls(str(parent), split="test")
            except ImportError as e:
                raise ImportError("Reading SVHN .mat files needs scipy: pip install scipy") from e
            return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), None,
                               f"torchvision SVHN at {parent}")
    return None
