"""scikit-learn's 8x8 digits: bundled with a dependency, so the default run needs no download."""
from __future__ import annotations

import numpy as np

from ..sources import ArraySource, DatasetNotFoundError, ImageSplits

__all__ = ["read_digits"]


def read_digits() -> ImageSplits:
    """The 1797 images at 0..255, a fixed stratified 80/20 split (seed 0)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DatasetNotFoundError("The 'digits' dataset ships with scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    tr_x, te_x, tr_y, te_y = train_test_split(images, digits.target, test_size=0.2, stratify=digits.target,
                                              random_state=0)
    return ImageSplits(ArraySource(tr_x, tr_y), ArraySource(te_x, te_y), [str(i) for i in range(10)],
                       "scikit-learn digits (load_digits), stratified 80/20 split, seed 0")
