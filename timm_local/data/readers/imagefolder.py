"""``train/<class>/*.png`` + ``test/<class>/*`` (or ``val/``...): torchvision's ``ImageFolder`` per split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sources import IMAGE_EXTENSIONS, TEST_SPLIT_NAMES, ImageSplits, TorchvisionSource

__all__ = ["read_imagefolder"]


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def _class_folder_splits(root: Path) -> Optional[tuple[Path, Path]]:
    """``root/train/<class>/img`` + ``root/{test,val,...}/<class>/img`` -> the two split folders."""
    train = root / "train"
    if not train.is_dir() or not any(p.is_dir() for p in train.iterdir()):
        return None
    for name in TEST_SPLIT_NAMES:
        test = root / name
        if test.is_dir() and any(p.is_dir() for p in test.iterdir()):
            return train, test
    return None


def read_imagefolder(root: Path, image_column: Optional[str] = None, label_column: Optional[str] = None
                     ) -> Optional[ImageSplits]:
    """Class folders under ``root/train`` and a test split, else None (column names do not apply)."""
    splits = _class_folder_splits(root)
    if splits is None or not _has_images(splits[0]):
        return None
    from torchvision.datasets import ImageFolder

    train, test = ImageFolder(str(splits[0])), ImageFolder(str(splits[1]))
    if train.classes != test.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(f"{root}: train/ and {splits[1].name}/ have different class folders (differ in {missing}); "
                         f"labels would not match.")
    return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), list(train.classes),
                       f"image folders {splits[0]} and {splits[1]}")
