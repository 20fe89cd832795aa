"""Writers of tiny datasets in every on-disk format timm_local.data reads (no tests here).

Each writer produces real files in the real layout (torchvision CIFAR pickles, IDX .gz, SVHN .mat,
STL-10 binaries, HF save_to_disk, parquet, class folders) from the same deterministic arrays, so the
tests can check pixel-exact round trips. Images carry a class-dependent brightness so a model can
learn something in a few steps.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_arrays(n: int, size: int, channels: int, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, H, W[, C]) and labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    base = (labels * (200 // max(num_classes - 1, 1)))[:, None, None]
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    noise = rng.integers(0, 56, size=shape)
    images = (base if channels == 1 else base[..., None]) + noise
    return images.astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``cifar-10-batches-py`` layout (5 train pickles + test + meta). Returns the train arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, size, 3, seed=1)
    xt, yt = make_arrays(n_test, size, 3, seed=2)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        entry = {"data": x[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), "labels": y[idx].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": xt.transpose(0, 3, 1, 2).reshape(n_test, -1),
                                                       "labels": yt.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    return x, y


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_idx(root: Path, n_train: int = 20, n_test: int = 10, size: int = 28, gz: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST IDX files, gzipped like Debian's dataset-fashion-mnist. Returns the train arrays."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, size, 1, seed=3)
    xt, yt = make_arrays(n_test, size, 1, seed=4)
    files = {"train-images-idx3-ubyte": x, "train-labels-idx1-ubyte": y, "t10k-images-idx3-ubyte": xt,
             "t10k-labels-idx1-ubyte": yt}
    for name, arr in files.items():
        data = _idx_bytes(arr)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return x, y


def write_svhn_mat(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` (X: H x W x C x N, y in 1..10 with 10 = digit 0)."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, 32, 3, seed=5)
    xt, yt = make_arrays(n_test, 32, 3, seed=6)
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        labels = np.where(b == 0, 10, b).reshape(-1, 1)
        savemat(root / f"{name}_32x32.mat", {"X": a.transpose(1, 2, 3, 0), "y": labels})
    return x, y


def write_stl10(root: Path, n_train: int = 10, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's ``stl10_binary`` (column-major 3x96x96 uint8 images, labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, 96, 3, seed=7)
    xt, yt = make_arrays(n_test, 96, 3, seed=8)
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        (folder / f"{name}_X.bin").write_bytes(a.transpose(0, 3, 2, 1).tobytes())  # N, C, W, H
        (folder / f"{name}_y.bin").write_bytes((b + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    return x, y


def _hf_dict(n_train: int, n_test: int, size: int, channels: int):
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split, n, seed in (("train", n_train, 9), ("test", n_test, 10)):
        x, y = make_arrays(n, size, channels, seed=seed)
        splits[split] = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in x], "label": y.tolist()}, features=features)
    return datasets.DatasetDict(splits), make_arrays(n_train, size, channels, seed=9)


def write_hf_disk(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32, channels: int = 3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """An HF ``DatasetDict.save_to_disk`` folder with an Image and a ClassLabel column."""
    dsdict, arrays = _hf_dict(n_train, n_test, size, channels)
    dsdict.save_to_disk(str(root))
    return arrays


def write_parquet(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The hub's parquet layout: ``data/train-00000-of-00001.parquet`` and ``data/test-...``."""
    dsdict, arrays = _hf_dict(n_train, n_test, size, 3)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, ds in dsdict.items():
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return arrays


def write_imagefolder(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32, classes: int = 3,
                      test_name: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``train/<class>/*.png`` and ``test/<class>/*.png``; class folder names deliberately unsorted on disk."""
    from PIL import Image

    names = [f"c{k}_{n}" for k, n in zip(range(classes), CLASSES)][::-1]
    x, y = make_arrays(n_train, size, 3, num_classes=classes, seed=11)
    xt, yt = make_arrays(n_test, size, 3, num_classes=classes, seed=12)
    for split, (a, b) in {"train": (x, y), test_name: (xt, yt)}.items():
        for i, (img, label) in enumerate(zip(a, b)):
            folder = root / split / sorted(names)[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return x, y
