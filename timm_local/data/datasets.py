"""The one call a run makes for its data: transformed train/test sets and a description of them."""
from __future__ import annotations

import logging
from collections import Counter
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .recipes import RECIPES, generic_recipe
from .resolve import load_image_sources
from .seeded import SeededTransformDataset
from .sources import ImageSplits, TorchvisionSource, image_file_sizes
from .transforms import build_transform, expand_stats

__all__ = ["DataConfig", "create_datasets", "native_image_size"]

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The resolved data settings of a run; saved in config.yaml and in the export's pretrained_cfg."""

    dataset: str
    origin: str
    num_classes: int
    classes: Optional[list[str]]
    image_size: int
    in_chans: int
    native_in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    train_size: int
    test_size: int
    augment: bool = True
    recipe: str = ""

    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing entries timm keeps in ``pretrained_cfg`` (used by timm's data config)."""
        return {
            "input_size": (self.in_chans, self.image_size, self.image_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


def _num_classes_of(splits: ImageSplits) -> int:
    if splits.classes:
        return len(splits.classes)
    src = splits.train
    labels = getattr(src, "labels", None)
    if labels is None and isinstance(src, TorchvisionSource):
        labels = getattr(src.dataset, "targets", None) or getattr(src.dataset, "labels", None)
    if labels is None:
        labels = [src[i][1] for i in range(len(src))]
    return int(np.max(np.asarray(labels))) + 1


def native_image_size(splits: ImageSplits, image_size: Optional[int]) -> Optional[int]:
    """The input size of a dataset without a recipe, from the sizes of its image files (checked at start,
    :func:`~timm_local.data.sources.image_file_sizes`): the most common one, with a warning when they differ.
    None where the source is not image files (the first image's size is used)."""
    sizes: Optional[Counter] = None
    for source in (splits.train, splits.test):
        found = image_file_sizes(source)
        if found is not None:
            sizes = found if sizes is None else sizes + found
    if not sizes:
        return None
    common = max(sizes.most_common(1)[0][0])
    if len(sizes) > 1:
        counts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common())
        chosen = f"--image-size {image_size}" if image_size else f"{common} px, the most common (--image-size sets another)"
        logger.warning("%s: images of %d different sizes (%s); all are resized to %s", splits.origin, len(sizes),
                       counts, chosen)
    return common


def create_datasets(
    dataset: Optional[str] = None,
    data_dir: Optional[str] = None,
    *,
    image_size: Optional[int] = None,
    in_chans: int = 3,
    num_classes: Optional[int] = None,
    augment: bool = True,
    seed: int = 0,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    augmentation: Optional[Mapping[str, Any]] = None,
) -> tuple[SeededTransformDataset, SeededTransformDataset, DataConfig]:
    """Build the transformed train and test datasets of a run and describe them.

    ``image_size`` defaults to the dataset's own (32 for CIFAR, 96 for STL-10, ...); ``in_chans`` is
    what the model wants. ``num_classes`` may exceed the labels found (never fall short of them).
    ``augmentation``: timm's transform knobs (:func:`~timm_local.data.transforms.build_transform`'s ``extra``),
    where ``crop_pct`` / ``interpolation`` override the dataset's own.
    """
    splits = load_image_sources(dataset, data_dir, image_column, label_column)
    found_classes = _num_classes_of(splits)
    if num_classes is not None and num_classes < found_classes:
        raise ValueError(f"num_classes={num_classes} but the dataset has {found_classes} classes ({splits.origin}).")
    recipe = splits.recipe
    extra = dict(augmentation or {})
    overrides = {k: extra.pop(k) for k in ("crop_pct", "interpolation") if extra.get(k) is not None}
    if recipe is None:
        native = native_image_size(splits, image_size)
        first, _ = splits.train[0]
        native_chans = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
        recipe = generic_recipe(str(dataset), image_size or native or max(first.size), native_chans, found_classes)
    recipe = dataclasses.replace(recipe, **overrides) if overrides else recipe
    size = int(image_size or recipe.image_size)
    mean_ = expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std_ = expand_stats(std if std is not None else recipe.std, in_chans)
    train = SeededTransformDataset(splits.train, build_transform(recipe, size, in_chans, True, augment, mean_, std_, extra),
                                   seed=seed)
    test = SeededTransformDataset(splits.test, build_transform(recipe, size, in_chans, False, augment, mean_, std_),
                                  seed=seed)
    cfg = DataConfig(
        dataset=recipe.name if recipe.name in RECIPES else str(dataset), origin=splits.origin,
        num_classes=int(num_classes or found_classes), classes=splits.classes, image_size=size, in_chans=in_chans,
        native_in_chans=recipe.in_chans, mean=mean_, std=std_, crop_pct=recipe.crop_pct,
        interpolation=recipe.interpolation, train_size=len(train), test_size=len(test), augment=augment,
        recipe=recipe.name if recipe.name in RECIPES else "generic",
    )
    return train, test, cfg
