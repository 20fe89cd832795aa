"""MNIST-format IDX files (MNIST, Fashion-MNIST), gzipped or not."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np

from ..sources import ArraySource, ImageSplits

__all__ = ["IDX_STEMS", "find_idx", "read_fashion_mnist", "read_idx", "read_mnist"]

#: train images, train labels, test images, test labels.
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array.

    Hand-written because torchvision's MNIST reader insists on its own ``MNIST/raw`` layout with
    uncompressed files, while distributions (e.g. Debian's ``dataset-fashion-mnist``) ship ``.gz``.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if magic >> 16 != 0 or dtype_code not in dtypes or ndim == 0:
        raise ValueError(f"{path} is not an IDX file (magic {magic:#010x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values (truncated?)")
    return array.reshape(shape)


def find_idx(folder: Path, stem: str) -> Optional[Path]:
    """The file of IDX ``stem`` in ``folder`` under any of its usual names (``.gz``, ``-idx`` or ``.idx``)."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read(root: Path, torchvision_folder: str, label: str) -> Optional[ImageSplits]:
    for folder in (root, root / torchvision_folder / "raw", root / "raw"):
        paths = [find_idx(folder, s) for s in IDX_STEMS]
        if all(paths):
            train = ArraySource(read_idx(paths[0]), read_idx(paths[1]))
            test = ArraySource(read_idx(paths[2]), read_idx(paths[3]))
            return ImageSplits(train, test, None, f"{label} IDX files in {folder}")
    return None


def read_mnist(root: Path) -> Optional[ImageSplits]:
    """The four IDX files in ``root`` (or torchvision's ``MNIST/raw``, or ``raw``), else None."""
    return _read(root, "MNIST", "mnist")


def read_fashion_mnist(root: Path) -> Optional[ImageSplits]:
    """The four IDX files in ``root`` (or torchvision's ``FashionMNIST/raw``, or ``raw``), else None."""
    return _read(root, "FashionMNIST", "fashion_mnist")
