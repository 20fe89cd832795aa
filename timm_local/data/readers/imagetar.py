"""``train.tar`` + ``val.tar`` (or ``test.tar``): images in class folders inside tar files, through timm.

ImageNet's own ``ILSVRC2012_img_train.tar`` (one tar per class inside it) is this layout; so is a folder
tree packed as one tar per split, which a network disk serves as one sequential read instead of a million
small ones. timm's ``ImageDataset`` indexes the members (``ReaderImageInTar``) and reads them by offset, so
the result is random-access and keeps the seeded order and exact resume of class folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sources import TEST_SPLIT_NAMES, ImageSplits
from ..streams import TimmSource

__all__ = ["read_image_tars"]


def read_image_tars(root: Path, image_column: Optional[str] = None, label_column: Optional[str] = None
                    ) -> Optional[ImageSplits]:
    """``root/train.tar`` and a held-out ``root/{test,val,...}.tar``, else None (column names do not apply)."""
    train_tar = root / "train.tar"
    test_tar = next((root / f"{n}.tar" for n in TEST_SPLIT_NAMES if (root / f"{n}.tar").is_file()), None)
    if not train_tar.is_file() or test_tar is None:
        return None
    from timm.data import create_dataset

    train, test = (create_dataset("", root=str(tar), is_training=False) for tar in (train_tar, test_tar))
    names = [n for n, _ in sorted(train.reader.class_name_to_idx.items(), key=lambda kv: kv[1])]
    if train.reader.class_name_to_idx != test.reader.class_name_to_idx:
        raise ValueError(f"{root}: {train_tar.name} and {test_tar.name} hold different class folders; labels would "
                         f"not match")
    origin = f"image tars {train_tar} and {test_tar}"
    return ImageSplits(TimmSource(train, str(train_tar)), TimmSource(test, str(test_tar)), names, origin)
