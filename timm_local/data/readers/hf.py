"""Hugging Face datasets: a ``DatasetDict.save_to_disk`` folder, parquet files, or the hub itself."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..sources import TEST_SPLIT_NAMES, DatasetNotFoundError, HFSource, ImageSplits

__all__ = ["hf_splits", "read_hf_disk", "read_hub", "read_parquet"]


def hf_splits(dsdict: Any, origin: str, image_column: Optional[str], label_column: Optional[str]) -> ImageSplits:
    """The train split and the first held-out split (``test``, ``val``...) of a ``DatasetDict``."""
    names = list(dsdict.keys())
    train_name = "train" if "train" in names else None
    test_name = next((n for n in TEST_SPLIT_NAMES if n in names), None)
    if train_name is None or test_name is None:
        raise ValueError(f"{origin} has splits {names}; need 'train' and one of {list(TEST_SPLIT_NAMES)}.")
    train = HFSource(dsdict[train_name], image_column, label_column)
    test = HFSource(dsdict[test_name], image_column, label_column)
    return ImageSplits(train, test, train.class_names(), f"{origin} (splits {train_name}/{test_name})")


def read_hf_disk(root: Path, image_column: Optional[str] = None, label_column: Optional[str] = None
                 ) -> Optional[ImageSplits]:
    """A ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``), else None."""
    if (root / "dataset_dict.json").is_file():
        import datasets

        return hf_splits(datasets.load_from_disk(str(root)), f"HF save_to_disk folder {root}", image_column,
                         label_column)
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        raise ValueError(f"{root} holds a single HF Dataset without splits; save a DatasetDict with 'train' and "
                         f"'test' splits (DatasetDict(train=..., test=...).save_to_disk(...)).")
    return None


def read_parquet(root: Path, image_column: Optional[str] = None, label_column: Optional[str] = None
                 ) -> Optional[ImageSplits]:
    """Parquet files named for their split (the hub's ``data/train-00000-of-00001.parquet``, ``train/*``...).

    The split of each file is found by ``datasets``' own data-file patterns (``load_dataset("parquet",
    data_dir=...)``), the same rules the hub applies to a repository.
    """
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        return None
    import datasets

    dsdict = datasets.load_dataset("parquet", data_dir=str(root))
    if not any(n in dsdict for n in TEST_SPLIT_NAMES):
        raise ValueError(f"{root} has parquet files but they are not named for a 'train' and a 'test' split "
                         f"(expected e.g. train-00000.parquet and test-00000.parquet, or train/ and test/ folders): "
                         f"{[p.name for p in files[:5]]}")
    return hf_splits(dsdict, f"parquet files in {root}", image_column, label_column)


def read_hub(hub_id: str, image_column: Optional[str] = None, label_column: Optional[str] = None) -> ImageSplits:
    """``datasets.load_dataset(hub_id)``: the hub, or its local cache with ``HF_DATASETS_OFFLINE=1``."""
    import datasets

    try:
        dsdict = datasets.load_dataset(hub_id)
    except Exception as e:  # network down, gated, unknown id: say what to do instead
        raise DatasetNotFoundError(
            f"Could not load the HF hub dataset {hub_id!r}: {type(e).__name__}: {e}\n"
            f"Without network, use a copy on disk: on a connected machine run "
            f"`datasets.load_dataset({hub_id!r}).save_to_disk(PATH)` and pass --data-dir PATH, or set "
            f"HF_DATASETS_OFFLINE=1 to read the local cache only.") from e
    return hf_splits(dsdict, f"HF hub dataset {hub_id}", image_column, label_column)
