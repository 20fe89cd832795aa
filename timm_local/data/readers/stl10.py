"""STL-10's binaries (``stl10_binary/``), labelled splits only."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sources import DatasetNotFoundError, ImageSplits, TorchvisionSource
from .presence import presence_only

__all__ = ["read_stl10"]


def read_stl10(root: Path) -> Optional[ImageSplits]:
    """``root/stl10_binary/`` (or that folder itself), else None."""
    from torchvision.datasets import STL10

    folder = STL10.base_folder
    parent = root if (root / folder).is_dir() else (root.parent if root.name == folder else None)
    if parent is None:
        return None
    # unlabeled_X.bin (2.7 GB) is not needed for supervised training: only require the labelled files.
    cls = presence_only(STL10, train_list=[[f, None] for f, _ in STL10.train_list[:2]],
                        test_list=[[f, None] for f, _ in STL10.test_list])
    try:
        train, test = cls(str(parent), split="train"), cls(str(parent), split="test")
    except RuntimeError as e:
        raise DatasetNotFoundError(f"{parent / folder} is incomplete: {e}") from e
    classes = getattr(train, "classes", None) or [str(i) for i in range(10)]
    return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), list(classes),
                       f"torchvision STL10 at {parent / folder}")
