#!/usr/bin/env python
"""Write a generated ImageNet-like dataset: N classes of JPEGs at ImageNet's mix of sizes, nothing downloaded.

    python tools/make_fake_imagenet.py OUT --classes 10 --train-per-class 50 --val-per-class 10

writes the same images four ways, one per route of docs/training.md's "ImageNet" section:

    OUT/folder/{train,val}/<wnid>/<wnid>_<i>.JPEG        --dataset OUT/folder
    OUT/wds/imagenet-{train,val}-NNNNNN.tar + _info.json --dataset wds/ --data-dir OUT/wds
    OUT/hf/  (DatasetDict.save_to_disk, ClassLabel)      --dataset OUT/hf   (--streaming: as a stream)
    OUT/tar/{train,val}.tar  (<wnid>/<name>.JPEG inside)  --dataset OUT/tar

Why generated: tests and the loader benchmark need files shaped like ImageNet's (JPEG, 500x375 mostly,
baseline-encoded at a photo's quality) without the 150 GB download. Pixels are a smooth class colour plus
noise, so a model can tell the classes apart and the JPEG sizes resemble photos'.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

#: ImageNet-1k train sizes (width, height) and roughly how often they occur: 500x375 and 500x333 landscape
#: photos dominate, then portrait and square ones; the rest is a long tail, represented by 400x300.
SIZE_MIX: tuple[tuple[tuple[int, int], float], ...] = (
    ((500, 375), 0.45), ((500, 333), 0.18), ((375, 500), 0.10), ((500, 500), 0.07), ((333, 500), 0.05),
    ((400, 300), 0.15),
)
ROUTES = ("folder", "wds", "hf", "tar")


def wnids(classes: int) -> list[str]:
    """WordNet-id-like class folder names (n00000000, ...), sorted like ImageNet's."""
    return [f"n{i:08d}" for i in range(classes)]


def image_sizes(n: int, seed: int, size: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
    """``n`` sizes drawn from :data:`SIZE_MIX` (or all ``size``)."""
    if size is not None:
        return [size] * n
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(SIZE_MIX), size=n, p=[w for _, w in SIZE_MIX])
    return [SIZE_MIX[c][0] for c in choices]


def jpeg_bytes(label: int, classes: int, size: tuple[int, int], rng: np.random.Generator, quality: int = 90) -> bytes:
    """One JPEG: a low-frequency class-coloured pattern (what photos mostly are) plus pixel noise."""
    width, height = size
    hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256], dtype=np.float32)
    coarse = rng.normal(0.0, 40.0, size=(height // 32 + 1, width // 32 + 1, 3)).astype(np.float32) + hue
    smooth = np.asarray(Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                         Image.BILINEAR))
    noisy = smooth.astype(np.int16) + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate(classes: int, per_class: int, seed: int, size: Optional[tuple[int, int]] = None
             ) -> list[tuple[str, int, bytes]]:
    """``(name, label, jpeg)`` for ``per_class`` images of each class, deterministic in ``seed``."""
    names = wnids(classes)
    sizes = image_sizes(classes * per_class, seed, size)
    rng = np.random.default_rng(seed + 1)
    out = []
    for i in range(classes * per_class):
        label = i % classes
        out.append((f"{names[label]}_{i // classes:06d}", label, jpeg_bytes(label, classes, sizes[i], rng)))
    return out


def write_folder(root: Path, split: str, images: Sequence[tuple[str, int, bytes]], classes: int) -> None:
    names = wnids(classes)
    for name, label, data in images:
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.JPEG").write_bytes(data)


def write_shards(root: Path, split: str, images: Sequence[tuple[str, int, bytes]], shard_size: int) -> dict:
    """webdataset tar shards (``<key>.jpg`` + ``<key>.cls``) and the split's entry of timm's ``_info.json``."""
    root.mkdir(parents=True, exist_ok=True)
    filenames, lengths = [], []
    for start in range(0, len(images), shard_size):
        name = f"imagenet-{split}-{start // shard_size:06d}.tar"
        chunk = images[start:start + shard_size]
        with tarfile.open(root / name, "w") as tar:
            for key, label, data in chunk:
                for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        filenames.append(name)
        lengths.append(len(chunk))
    return {"name": split, "num_samples": len(images), "filenames": filenames, "shard_lengths": lengths}


def write_tar(root: Path, split: str, images: Sequence[tuple[str, int, bytes]], classes: int) -> None:
    """One tar per split holding the class folders (a folder tree packed for a network disk)."""
    root.mkdir(parents=True, exist_ok=True)
    names = wnids(classes)
    with tarfile.open(root / f"{split}.tar", "w") as tar:
        for name, label, data in images:
            info = tarfile.TarInfo(f"{names[label]}/{name}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_hf(root: Path, splits: dict[str, Sequence[tuple[str, int, bytes]]], classes: int) -> None:
    """An HF ``DatasetDict`` with an ``Image`` and a ``ClassLabel`` column (the hub's imagenet-1k features)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=wnids(classes))})
    dsdict = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [{"bytes": data, "path": None} for _, _, data in images],
             "label": [label for _, label, _ in images]}, features=features)
        for split, images in splits.items()})
    dsdict.save_to_disk(str(root))


def make_fake_imagenet(out: Path, classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
                       routes: Sequence[str] = ROUTES, shard_size: int = 64, seed: int = 0,
                       size: Optional[tuple[int, int]] = None) -> dict[str, Path]:
    """Write the dataset under ``out`` for each of ``routes``; returns ``{route: path}``."""
    out = Path(out)
    splits = {"train": generate(classes, train_per_class, seed, size),
              "val": generate(classes, val_per_class, seed + 1000, size)}
    written: dict[str, Path] = {}
    if "folder" in routes:
        for split, images in splits.items():
            write_folder(out / "folder", split, images, classes)
        written["folder"] = out / "folder"
    if "wds" in routes:
        info = {"name": "fake-imagenet", "num_classes": classes,
                "splits": {split: write_shards(out / "wds", split, images, shard_size)
                           for split, images in splits.items()}}
        (out / "wds" / "_info.json").write_text(json.dumps(info, indent=1))
        written["wds"] = out / "wds"
    if "hf" in routes:
        write_hf(out / "hf", splits, classes)
        written["hf"] = out / "hf"
    if "tar" in routes:
        for split, images in splits.items():
            write_tar(out / "tar", split, images, classes)
        written["tar"] = out / "tar"
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--routes", default=",".join(ROUTES), help="comma list of " + ", ".join(ROUTES))
    p.add_argument("--shard-size", type=int, default=64, help="images per tar shard")
    p.add_argument("--size", default=None, help="WxH for every image (default: ImageNet's mix)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    written = make_fake_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class,
                                 [r for r in args.routes.split(",") if r], args.shard_size, args.seed, size)
    for route, path in written.items():
        print(f"{route}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
