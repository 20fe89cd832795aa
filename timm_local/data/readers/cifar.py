"""CIFAR-10 / CIFAR-100 in torchvision's pickle layout (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sources import DatasetNotFoundError, ImageSplits, TorchvisionSource
from .presence import presence_only

__all__ = ["read_cifar10", "read_cifar100"]


def _read(root: Path, hundred: bool) -> Optional[ImageSplits]:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR100 if hundred else CIFAR10
    folder = base.base_folder
    if (root / folder).is_dir():
        parent = root
    elif root.name == folder and root.is_dir():
        parent = root.parent
    else:
        return None
    cls = presence_only(
        base,
        train_list=[[f, None] for f, _ in base.train_list],
        test_list=[[f, None] for f, _ in base.test_list],
        meta={**base.meta, "md5": None},
    )
    try:
        train, test = cls(str(parent), train=True), cls(str(parent), train=False)
    except RuntimeError as e:
        raise DatasetNotFoundError(f"{parent / folder} is incomplete: {e}") from e
    return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), list(train.classes),
                       f"torchvision {base.__name__} at {parent / folder}")


def read_cifar10(root: Path) -> Optional[ImageSplits]:
    """``root/cifar-10-batches-py/`` (or that folder itself), else None."""
    return _read(root, hundred=False)


def read_cifar100(root: Path) -> Optional[ImageSplits]:
    """``root/cifar-100-python/`` (or that folder itself), else None."""
    return _read(root, hundred=True)
