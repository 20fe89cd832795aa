"""Image sources: every on-disk format becomes a random-access sequence of ``(PIL image, int label)``.

Readers (:mod:`timm_local.data.readers`) produce these; the transforms and the training loop never care
where the data came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
from PIL import Image

from ..errors import UserError
from .recipes import DatasetRecipe

__all__ = ["ArraySource", "CorruptImageError", "DatasetNotFoundError", "HFSource", "HUB_PREFIX", "IMAGE_EXTENSIONS",
           "ImageSource", "ImageSplits", "TEST_SPLIT_NAMES", "TorchvisionSource", "detect_hf_columns"]

#: timm's prefix for the Hugging Face hub; only this prefix ever reaches the network (here because both the
#: resolver and the streaming readers below it test for it).
HUB_PREFIX = "hf-hub:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
#: Names a held-out split goes by, in order of preference.
TEST_SPLIT_NAMES = ("test", "val", "validation", "valid")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """Raised when a dataset cannot be found locally. The message says where we looked and how to fix it."""


class CorruptImageError(UserError, ValueError):
    """An image that cannot be read or decoded. The message names the file (or the row) and what to do."""


class ImageSource(Protocol):
    """A random-access sequence of ``(PIL.Image, int label)`` pairs, before any transform."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


@dataclass
class ImageSplits:
    """A train and a test source plus what is known about them."""

    train: ImageSource
    test: ImageSource
    classes: Optional[list[str]]
    origin: str  # human-readable description of where the data came from
    recipe: Optional[DatasetRecipe] = None


class ArraySource:
    """In-memory uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


class TorchvisionSource:
    """A torchvision dataset constructed without transform (it already returns ``(PIL, int)``)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            img, label = self.dataset[index]
        except Exception as e:  # PIL raises OSError, SyntaxError or ValueError by format: name the file whatever it is
            raise CorruptImageError(f"{self.path(index)} cannot be decoded ({type(e).__name__}: {e}); replace or remove "
                                    f"the file") from e
        return img, int(label)

    def path(self, index: int) -> str:
        """The file of sample ``index`` (image folders), else its position in the dataset."""
        samples = getattr(self.dataset, "samples", None)
        return str(samples[index][0]) if samples else f"sample {index} of {type(self.dataset).__name__}"


class HFSource:
    """A split of an HF ``datasets.Dataset``; image and label columns detected from the features."""

    def __init__(self, dataset: Any, image_column: Optional[str] = None, label_column: Optional[str] = None) -> None:
        self.image_column, self.label_column = detect_hf_columns(dataset, image_column, label_column)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            row = self.dataset[int(index)]  # decodes the image
        except Exception as e:  # name the row and the file holding it, whatever the decoder raised
            files = [f["filename"] for f in getattr(self.dataset, "cache_files", [])]
            raise CorruptImageError(f"row {index} of {files[0] if files else 'the HF dataset'} cannot be decoded "
                                    f"({type(e).__name__}: {e})") from e
        img = row[self.image_column]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return img, int(row[self.label_column])

    def label_values(self) -> np.ndarray:
        """Every label, read from the label column alone: no image is decoded."""
        return np.asarray(self.dataset.select_columns([self.label_column]).with_format("numpy")[self.label_column])

    def class_names(self) -> Optional[list[str]]:
        feature = self.dataset.features[self.label_column]
        return list(feature.names) if hasattr(feature, "names") else None


def detect_hf_columns(dataset: Any, image_column: Optional[str], label_column: Optional[str]) -> tuple[str, str]:
    """The image and label columns of an HF dataset: the given ones, else found from its features."""
    import datasets

    features = dataset.features
    if image_column is None:
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        image_column = images[0] if images else next((k for k in ("image", "img", "pixel_values") if k in features), None)
    if label_column is None:
        labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        preferred = [k for k in ("label", "labels", "fine_label") if k in labels or k in features]
        label_column = preferred[0] if preferred else (labels[0] if labels else None)
    if image_column not in features or label_column not in features:
        raise ValueError(f"Could not find the image/label columns in features {list(features)}; set "
                         f"image_column / label_column in the config.")
    return image_column, label_column
