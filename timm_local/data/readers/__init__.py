"""One reader per on-disk format, looked up by name from a dataset's recipe.

A reader takes a folder and returns :class:`~timm_local.data.sources.ImageSplits`, or None when the
folder does not hold its format (so the resolver can try the next one); a folder that holds the format
but is broken raises a clear error instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..sources import ImageSplits
from .cifar import read_cifar10, read_cifar100
from .digits import read_digits
from .hf import hf_splits, read_hf_disk, read_hub, read_parquet
from .idx import IDX_STEMS, find_idx, read_fashion_mnist, read_idx, read_mnist
from .imagefolder import read_imagefolder
from .imagetar import read_image_tars
from .stl10 import read_stl10
from .svhn import read_svhn

__all__ = ["BUNDLED_READERS", "GENERIC_READERS", "IDX_STEMS", "READERS", "find_idx", "hf_splits", "read_hub",
           "read_idx"]

#: Readers of a dataset's own layout, by the name a recipe gives in ``DatasetRecipe.reader``.
READERS: dict[str, Callable[[Path], Optional[ImageSplits]]] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
    "stl10": read_stl10,
    "mnist": read_mnist,
    "fashion_mnist": read_fashion_mnist,
}

#: Datasets that ship with a dependency (``DatasetRecipe.bundled``): no folder to read.
BUNDLED_READERS: dict[str, Callable[[], ImageSplits]] = {"digits": read_digits}

#: Dataset-agnostic formats, tried in this order on any folder: (folder, image_column, label_column).
GENERIC_READERS: tuple[Callable[[Path, Optional[str], Optional[str]], Optional[ImageSplits]], ...] = (
    read_hf_disk, read_imagefolder, read_parquet, read_image_tars,
)
