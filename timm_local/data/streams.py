"""Datasets at scale: timm's dataset specs (``hfds/``, ``hfids/``, ``wds/``) and HF streaming.

Two kinds, and why they differ:

* **Map-style** (``hfds/NAME``, timm's ``ImageDataset`` over ``datasets.load_dataset``): random access, so
  it becomes an ordinary :class:`~.sources.ImageSource` and keeps everything map-style sets have -- the
  seeded (seed, epoch) order, per-sample seeded augmentation and the bitwise resume.
* **Streams** (``wds/`` tar shards, ``hfids/NAME``, ``--streaming`` for an HF dataset): read front to back
  from shards, never listed or indexed, which is what a network disk or the hub at ImageNet scale needs.
  Each process reads its own shards (timm's readers split shards over ranks and loader workers; HF's
  ``split_dataset_by_node`` does the same), so every sample is read once per epoch when the shards divide
  evenly. The resume rule: at an epoch boundary a stream restarts that epoch's shards; inside an epoch
  the consumed batches are read again and skipped (nothing is trained twice), but shuffle buffers make
  the skipped samples equal to the trained ones only for HF streams (``shuffle(seed).set_epoch``), not for
  ``wds/`` (timm seeds its buffer per loader worker). Exact mid-epoch resume needs a map-style format.

``wds/`` and ``hfds/`` go through ``timm.data.create_dataset``. HF streams (``hfids/`` and ``--streaming``)
are read by :class:`HFStream`, which makes the calls timm's hfids reader makes (``load_dataset(...,
streaming=True)``, ``shuffle(seed)``, ``split_dataset_by_node``) but also takes a local ``save_to_disk``
folder (``Dataset.to_iterable_dataset``), whose size is known without a pass over it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import IterableDataset

from .sources import HUB_PREFIX, TEST_SPLIT_NAMES, CorruptImageError, ImageSplits

__all__ = ["MAP_PREFIXES", "STREAM_PREFIXES", "HFStream", "Stream", "TimmSource", "open_streams", "read_timm_map",
           "spec_prefix"]

#: timm's dataset-spec prefixes read here; ``tfds/`` needs TensorFlow, which this project does not install.
MAP_PREFIXES = ("hfds/",)
STREAM_PREFIXES = ("hfids/", "wds/")
_SHUFFLE_BUFFER = 4096  # HF streams: samples held for shuffling, as timm's hfids reader


def spec_prefix(dataset: Optional[str]) -> Optional[str]:
    """``"hfds/"``, ``"hfids/"``, ``"wds/"`` (case-insensitive, as timm) when ``dataset`` is such a spec."""
    if not dataset or "/" not in dataset:
        return None
    prefix = dataset.split("/", 1)[0].lower() + "/"
    if prefix == "tfds/":
        raise ValueError("tfds/ datasets need TensorFlow Datasets, which timm_local does not install; use the HF "
                         "(hfds/, hfids/) or webdataset (wds/) copy of the dataset")
    return prefix if prefix in MAP_PREFIXES + STREAM_PREFIXES else None


class TimmSource:
    """A timm map-style ``ImageDataset`` without transform as an :class:`~.sources.ImageSource`."""

    def __init__(self, dataset: Any, origin: str) -> None:
        self.dataset, self.origin = dataset, origin

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            img, target = self.dataset[int(index)]
        except Exception as e:  # whatever the decoder raised: name the sample
            raise CorruptImageError(f"sample {index} of {self.origin} cannot be decoded ({type(e).__name__}: {e})"
                                    ) from e
        return img, int(target)


def _timm_dataset(spec: str, root: Optional[str], split: str, **kwargs: Any) -> Any:
    from timm.data import create_dataset

    return create_dataset(spec, root=root, split=split, **kwargs)


def read_timm_map(spec: str, root: Optional[str], image_column: Optional[str], label_column: Optional[str]
                  ) -> ImageSplits:
    """``hfds/NAME`` through ``timm.data.create_dataset``: the ``train`` split and the first held-out one."""
    keys = dict(input_key=image_column or "image", target_key=label_column or "label")
    train = _timm_dataset(spec, root, "train", **keys)
    test, tried = None, []
    for split in ("validation", *TEST_SPLIT_NAMES):
        try:
            test = _timm_dataset(spec, root, split, **keys)
            break
        except ValueError as e:  # datasets: unknown split
            tried.append(f"{split} ({str(e).splitlines()[0]})")
    if test is None:
        raise ValueError(f"{spec} has no held-out split; tried {', '.join(tried)}")
    mapping = train.reader.class_to_idx
    classes = [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])] if mapping else None
    origin = f"timm dataset {spec}"
    return ImageSplits(TimmSource(train, origin), TimmSource(test, origin), classes, f"{origin} (train / {split})")


class Stream(IterableDataset):
    """What the training loop needs of a stream: ``set_epoch``, ``num_samples`` (all processes together)."""

    num_samples: int

    def set_epoch(self, epoch: int) -> None: ...


class HFStream(Stream):
    """An HF ``IterableDataset`` split over ranks (``split_dataset_by_node``) and loader workers (``datasets``
    assigns shards to workers), shuffled by (seed, epoch) when training, with ``transform`` applied."""

    def __init__(self, dataset: Any, num_samples: int, transform: Callable, image_column: str, label_column: str,
                 shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.num_samples, self.transform = dataset, int(num_samples), transform
        self.image_column, self.label_column = image_column, label_column
        self.shuffle, self.seed, self.rank, self.world = shuffle, int(seed), rank, world
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(int(epoch))

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        from datasets.distributed import split_dataset_by_node

        ds = self.dataset
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=_SHUFFLE_BUFFER)
            ds.set_epoch(int(self.shared_epoch))
        if self.world > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        for row in ds:
            img = row[self.image_column]
            yield self.transform(img.convert("RGB") if img.mode != "RGB" else img), int(row[self.label_column])


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _hf_stream_splits(dataset: str, data_dir: Optional[str], image_column: Optional[str],
                      label_column: Optional[str], shards: int) -> tuple[Any, Any, int, int, list[str], str]:
    """``--streaming``: an HF dataset on disk (``save_to_disk``) or on the hub, as iterable train/test splits."""
    import datasets

    from .sources import detect_hf_columns

    if dataset.startswith(HUB_PREFIX) or dataset.lower().startswith("hfids/"):
        name = dataset.split(":", 1)[1] if dataset.startswith(HUB_PREFIX) else dataset.split("/", 1)[1]
        info = datasets.load_dataset_builder(name, cache_dir=data_dir).info
        if not info.splits:
            raise ValueError(f"{dataset}: the split sizes are not in the dataset's info (hub datasets have them, "
                             f"local data files do not) and a stream needs them for its steps per epoch; use "
                             f"hfds/{name} (map-style), or save_to_disk it and pass the folder with --streaming")
        splits = {s: datasets.load_dataset(name, split=s, streaming=True, cache_dir=data_dir) for s in info.splits}
        sizes = {s: int(info.splits[s].num_examples or 0) for s in info.splits}
        features = info.features
    elif (Path(dataset) / "dataset_dict.json").is_file():
        disk = datasets.load_from_disk(dataset)
        splits = {s: disk[s].to_iterable_dataset(num_shards=min(shards, len(disk[s]))) for s in disk}
        sizes = {s: len(disk[s]) for s in disk}
        features = disk["train"].features
    else:
        raise ValueError(f"--streaming reads an HF dataset: a save_to_disk folder or hf-hub:OWNER/NAME, not "
                         f"{dataset!r}")
    test = next((s for s in ("validation", *TEST_SPLIT_NAMES) if s in splits), None)
    if "train" not in splits or test is None or not sizes["train"]:
        raise ValueError(f"{dataset}: streaming needs a 'train' split of known size and a held-out split; found "
                         f"{ {s: sizes[s] for s in splits} }")
    image_column, label_column = detect_hf_columns(splits["train"], image_column, label_column)
    names = getattr(features[label_column], "names", None)
    if names is None:
        raise ValueError(f"{dataset}: the label column {label_column!r} is not a ClassLabel, and a stream cannot be "
                         f"scanned for its classes; pass --num-classes")
    return splits["train"], splits[test], sizes["train"], sizes[test], list(names), f"{image_column}|{label_column}"


def _stream_size(root: Optional[str], split: str) -> Optional[dict[str, Any]]:
    """A ``wds/`` split's entry of timm's ``_info.json`` (sample count, shards), or None without one."""
    for name in ("_info.json", "info.json"):
        path = Path(root or ".") / name
        if path.is_file():
            info = json.loads(path.read_text())
            return {**info.get("splits", {}).get(split, {}), "num_classes": info.get("num_classes")}
    return None


def open_streams(dataset: str, data_dir: Optional[str], transforms: tuple[Callable, Callable], batch_size: int,
                 seed: int, workers: int, image_column: Optional[str], label_column: Optional[str],
                 num_classes: Optional[int]) -> tuple[Stream, Stream, int, Optional[list[str]], str]:
    """Train and held-out streams with ``transforms`` applied, the class count and names, and their origin.

    The held-out stream is read whole by every process (no per-rank padding can make evaluation's gather
    uneven); the accuracy is that of the whole split.
    """
    rank, world = _rank_world()
    prefix = spec_prefix(dataset)
    if prefix == "wds/":
        return _wds_streams(dataset, data_dir, transforms, batch_size, seed, workers, num_classes)
    train_ds, test_ds, n_train, n_test, names, columns = _hf_stream_splits(
        dataset, data_dir, image_column, label_column, shards=max(1, world * max(workers, 1)))
    image_column, label_column = columns.split("|")
    train = HFStream(train_ds, n_train, transforms[0], image_column, label_column, True, seed, rank, world)
    test = HFStream(test_ds, n_test, transforms[1], image_column, label_column, False, seed)
    return train, test, len(names), names, f"HF stream {dataset}"


def _wds_streams(dataset: str, data_dir: Optional[str], transforms: tuple[Callable, Callable], batch_size: int,
                 seed: int, workers: int, num_classes: Optional[int]) -> tuple[Any, Any, int, None, str]:
    """``wds/``: timm's webdataset reader over the shards ``_info.json`` lists."""
    from timm.data import create_dataset

    info = _stream_size(data_dir, "train") or {}
    if not info.get("num_samples"):
        raise ValueError(f"wds/: {data_dir}/_info.json (timm's shard index: splits -> num_samples, filenames) is "
                         f"missing or has no train split; tools/make_fake_imagenet.py writes the format")
    held_out = next((s for s in ("validation", *TEST_SPLIT_NAMES)
                     if (_stream_size(data_dir, s) or {}).get("filenames")),
                    None)
    if held_out is None:
        raise ValueError(f"wds/: {data_dir}/_info.json has no held-out split (validation, test or val)")
    classes = num_classes or info.get("num_classes")
    if not classes:
        raise ValueError("wds/: the class count is not in _info.json (num_classes); pass --num-classes")
    train = create_dataset(dataset, root=data_dir, split="train", is_training=True, batch_size=batch_size, seed=seed,
                           transform=transforms[0])
    train.set_loader_cfg(num_workers=workers)
    train.num_samples = int(info["num_samples"])
    test = create_dataset(dataset, root=data_dir, split=held_out, transform=transforms[1])
    test.reader.dist_rank, test.reader.dist_num_replicas = 0, 1  # every process reads the whole held-out split
    test.set_loader_cfg(num_workers=workers)
    test.num_samples = int(_stream_size(data_dir, held_out)["num_samples"])
    return train, test, int(classes), None, f"webdataset shards in {data_dir} (train / {held_out})"
