"""Datasets for local-learning runs: named recipes, local folders in every common layout, HF datasets.

What this module guarantees, and why:

* **No silent downloads.** Named datasets (``cifar10``, ``mnist``, ...) are only ever read from
  disk. A missing dataset raises :class:`DatasetNotFoundError` listing every place that was
  searched and how to provide the data; a run on a machine without network never hangs on a
  download attempt. The one exception is an explicit Hugging Face hub id with timm's prefix
  (``--dataset hf-hub:uoft-cs/cifar10``), where the user asked for the hub.
* **One resolution path for every format.** A dataset is a name, a local path or a hub id; a named
  dataset's ``data_dir`` may be a torchvision-format root (``cifar-10-batches-py``, SVHN ``.mat``,
  ``stl10_binary``, MNIST IDX files, ``.gz`` or not), an HF ``save_to_disk`` folder, a folder of
  parquet files, or a plain ``train/`` + ``test/`` (or ``val/``) class-folder tree. All of them
  become the same :class:`ImageSource` protocol (``(PIL image, int label)`` pairs), so the
  transforms and the loop never care where data came from.
* **The paper's augmentation per dataset** (AUGLOCAL.md §5), with per-dataset mean/std, and
  grayscale sets expanded to the channel count the model wants.
* **Augmentation is a pure function of (seed, epoch, sample index).** Each sample's transform runs
  under its own seeded RNG (:class:`SeededTransformDataset`), so a resumed run -- even one resumed
  mid-epoch, or with a different number of loader workers -- sees exactly the same augmented
  images as an uninterrupted one, and augmentation never perturbs the training RNG stream.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetNotFoundError",
    "DatasetRecipe",
    "DataConfig",
    "ImageSource",
    "SeededTransformDataset",
    "DATA_DIR_ENV",
    "list_datasets",
    "get_recipe",
    "load_image_sources",
    "build_transform",
    "create_datasets",
]

#: Environment variable naming a root folder that holds datasets (searched for named datasets).
DATA_DIR_ENV = "TIMM_LOCAL_DATA_DIR"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_TEST_SPLIT_NAMES = ("test", "val", "validation", "valid")


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset cannot be found locally. The message says where we looked and how to fix it."""


class ImageSource(Protocol):
    """A random-access sequence of ``(PIL.Image, int label)`` pairs, before any transform."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


# ----------------------------------------------------------------------------------------------
# Recipes: what the paper (or, where it is silent, we) use per dataset.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetRecipe:
    """Everything dataset-specific a run needs besides the pixels.

    ``train_style`` picks the augmentation family: ``"pad_crop"`` = pad ``pad`` pixels + random crop
    back to the input size (+ horizontal flip if ``hflip``), i.e. the CIFAR/SVHN/STL-10 recipe of the
    paper; ``"imagenet"`` = timm's random-resized crop + flip for training and resize + center crop
    (``crop_pct``) for evaluation.
    """

    name: str
    num_classes: Optional[int]
    image_size: int  # default model input size (square)
    in_chans: int  # native channels of the stored images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_style: str = "pad_crop"
    pad: int = 4
    hflip: bool = True
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    hub_ids: tuple[str, ...] = ()
    how_to_get: str = ""


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # AUGLOCAL.md §5
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_RECIPES: dict[str, DatasetRecipe] = {
    r.name: r
    for r in [
        DatasetRecipe(
            "cifar10", 10, 32, 3, _CIFAR_MEAN, _CIFAR_STD, pad=4, hflip=True,
            hub_ids=("uoft-cs/cifar10", "cifar10"),
            how_to_get="extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                       "DATA_DIR/cifar-10-batches-py/ exists",
        ),
        DatasetRecipe(
            # CIFAR-100 statistics (train set); the paper gives CIFAR-10's only.
            "cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4, hflip=True,
            hub_ids=("uoft-cs/cifar100", "cifar100"),
            how_to_get="extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                       "DATA_DIR/cifar-100-python/ exists",
        ),
        DatasetRecipe(
            # Paper: pad 2 + random 32 crop, no flip (digits are not mirror-symmetric).
            "svhn", 10, 32, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), pad=2, hflip=False,
            hub_ids=("ufldl-stanford/svhn",),
            how_to_get="put train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) in DATA_DIR",
        ),
        DatasetRecipe(
            # Paper: 96x96, 4-pixel random translation + flip == pad 4 + random 96 crop + flip.
            "stl10", 10, 96, 3, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), pad=4, hflip=True,
            hub_ids=("tanganke/stl10",),
            how_to_get="extract stl10_binary.tar.gz (https://cs.stanford.edu/~acoates/stl10/) so that "
                       "DATA_DIR/stl10_binary/ exists (unlabeled_X.bin is not needed)",
        ),
        DatasetRecipe(
            "imagenet", 1000, 224, 3, _IMAGENET_MEAN, _IMAGENET_STD, train_style="imagenet", crop_pct=0.875,
            hub_ids=("ILSVRC/imagenet-1k",),
            how_to_get="arrange ImageNet-1k as DATA_DIR/train/<wnid>/*.JPEG and DATA_DIR/val/<wnid>/*.JPEG "
                       "(the usual image-folder layout), or save the HF dataset ILSVRC/imagenet-1k with "
                       "save_to_disk",
        ),
        DatasetRecipe(
            # Not in the paper. Small translations + flip (clothes are roughly mirror-symmetric).
            "fashion_mnist", 10, 28, 1, (0.2860,), (0.3530,), pad=2, hflip=True,
            hub_ids=("zalando-datasets/fashion_mnist", "fashion_mnist"),
            how_to_get="put the four IDX files (train-images-idx3-ubyte[.gz], ...; Debian/Ubuntu: "
                       "`apt-get install dataset-fashion-mnist`) in DATA_DIR",
        ),
        DatasetRecipe(
            # Not in the paper. Small translations, no flip.
            "mnist", 10, 28, 1, (0.1307,), (0.3081,), pad=2, hflip=False,
            hub_ids=("ylecun/mnist", "mnist"),
            how_to_get="put the four IDX files (train-images-idx3-ubyte[.gz], ...; http://yann.lecun.com/exdb/mnist/) "
                       "in DATA_DIR",
        ),
        DatasetRecipe(
            # scikit-learn's 8x8 digits (1797 images, ships with scikit-learn): the default dataset, so a run
            # works on real data with no download. Upsampled to 32x32 so CIFAR-style networks fit;
            # mean/std measured on the upsampled images. Fixed stratified 80/20 split (seed 0).
            "digits", 10, 32, 1, (0.3053,), (0.3236,), pad=2, hflip=False,
            how_to_get="install scikit-learn (`pip install scikit-learn`); the data ships with it",
        ),
    ]
}

#: The dataset used when none is given: real, tiny, and shipped with a dependency.
DEFAULT_DATASET = "digits"


def list_datasets() -> list[str]:
    """Names of the datasets that have a built-in recipe (transforms, mean/std, loaders)."""
    return sorted(_RECIPES)


def get_recipe(name: str) -> DatasetRecipe:
    """Return the recipe of a named dataset; unknown names get an error listing the known ones."""
    key = _normalise_name(name)
    if key not in _RECIPES:
        raise KeyError(f"Unknown dataset {name!r}. Known datasets: {', '.join(list_datasets())}; or give a local "
                       f"folder / HF hub id.")
    return _RECIPES[key]


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100", "stl_10": "stl10",
            "imagenet1k": "imagenet", "imagenet_1k": "imagenet"}.get(key, key)


def _generic_recipe(name: str, image_size: int, in_chans: int, num_classes: Optional[int]) -> DatasetRecipe:
    """Recipe for a dataset we know nothing about: ImageNet statistics, CIFAR-style aug when small."""
    small = image_size <= 64
    return DatasetRecipe(
        name=name, num_classes=num_classes, image_size=image_size, in_chans=in_chans,
        mean=_IMAGENET_MEAN if in_chans == 3 else (0.5,), std=_IMAGENET_STD if in_chans == 3 else (0.5,),
        train_style="pad_crop" if small else "imagenet", pad=max(1, image_size // 8), hflip=True,
        crop_pct=1.0 if small else 0.875,
    )


# ----------------------------------------------------------------------------------------------
# Image sources (no transforms)
# ----------------------------------------------------------------------------------------------
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
        img, label = self.dataset[index]
        return img, int(label)


class HFSource:
    """A split of an HF ``datasets.Dataset``; image and label columns detected from the features."""

    def __init__(self, dataset: Any, image_column: Optional[str] = None, label_column: Optional[str] = None) -> None:
        self.image_column, self.label_column = _detect_hf_columns(dataset, image_column, label_column)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.dataset[int(index)]
        img = row[self.image_column]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return img, int(row[self.label_column])

    def class_names(self) -> Optional[list[str]]:
        feature = self.dataset.features[self.label_column]
        return list(feature.names) if hasattr(feature, "names") else None


def _detect_hf_columns(dataset: Any, image_column: Optional[str], label_column: Optional[str]) -> tuple[str, str]:
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


@dataclass
class ImageSplits:
    """A train and a test source plus what is known about them."""

    train: ImageSource
    test: ImageSource
    classes: Optional[list[str]]
    origin: str  # human-readable description of where the data came from
    recipe: Optional[DatasetRecipe] = None


# ---------------- torchvision-format roots ----------------------------------------------------
def _presence_only(cls: type, **overrides: Any) -> type:
    """Subclass a torchvision dataset so that its integrity check tests presence, not MD5.

    Why: the MD5 check refuses any re-packaged or subset copy (and tiny test fixtures), and hashing
    hundreds of MB at every start is slow; a truncated file still fails loudly when parsed.
    """
    return type(f"Local{cls.__name__}", (cls,), overrides)


def _cifar_source(root: Path, hundred: bool) -> Optional[ImageSplits]:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR100 if hundred else CIFAR10
    folder = base.base_folder
    if (root / folder).is_dir():
        parent = root
    elif root.name == folder and root.is_dir():
        parent = root.parent
    else:
        return None
    cls = _presence_only(
        base,
        train_list=[[f, None] for f, _ in base.train_list],
        test_list=[[f, None] for f, _ in base.test_list],
        meta={**base.meta, "md5": None},
    )
    try:
        train, test = cls(str(parent), train=True), cls(str(parent), train=False)
    except RuntimeError as e:
        raise DatasetNotFoundError(f"{parent / folder} is incomplete: {e}") from e
    return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), list(train.classes),
                       f"torchvision {base.__name__} at {parent / folder}")


def _svhn_source(root: Path) -> Optional[ImageSplits]:
    from torchvision.datasets import SVHN

    for parent in (root, root / "svhn", root / "SVHN"):
        if (parent / "train_32x32.mat").is_file() and (parent / "test_32x32.mat").is_file():
            cls = _presence_only(SVHN, split_list={k: [u, f, None] for k, (u, f, _) in SVHN.split_list.items()})
            try:
                train, test = cls(str(parent), split="train"), cls(str(parent), split="test")
            except ImportError as e:
                raise ImportError("Reading SVHN .mat files needs scipy: pip install scipy") from e
            return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), [str(i) for i in range(10)],
                               f"torchvision SVHN at {parent}")
    return None


def _stl10_source(root: Path) -> Optional[ImageSplits]:
    from torchvision.datasets import STL10

    folder = STL10.base_folder
    parent = root if (root / folder).is_dir() else (root.parent if root.name == folder else None)
    if parent is None:
        return None
    # unlabeled_X.bin (2.7 GB) is not needed for supervised training: only require the labelled files.
    cls = _presence_only(STL10, train_list=[[f, None] for f, _ in STL10.train_list[:2]],
                         test_list=[[f, None] for f, _ in STL10.test_list])
    try:
        train, test = cls(str(parent), split="train"), cls(str(parent), split="test")
    except RuntimeError as e:
        raise DatasetNotFoundError(f"{parent / folder} is incomplete: {e}") from e
    classes = getattr(train, "classes", None) or [str(i) for i in range(10)]
    return ImageSplits(TorchvisionSource(train), TorchvisionSource(test), list(classes), f"torchvision STL10 at {parent / folder}")


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


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist_like_source(root: Path, torchvision_folder: str, label: str) -> Optional[ImageSplits]:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in (root, root / torchvision_folder / "raw", root / "raw"):
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            train = ArraySource(read_idx(paths[0]), read_idx(paths[1]))
            test = ArraySource(read_idx(paths[2]), read_idx(paths[3]))
            return ImageSplits(train, test, None, f"{label} IDX files in {folder}")
    return None


_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]


def _digits_source() -> ImageSplits:
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


# ---------------- generic local folders ------------------------------------------------------
def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def _class_folder_splits(root: Path) -> Optional[tuple[Path, Path]]:
    """``root/train/<class>/img`` + ``root/{test,val,...}/<class>/img`` -> the two split folders."""
    train = root / "train"
    if not train.is_dir() or not any(p.is_dir() for p in train.iterdir()):
        return None
    for name in _TEST_SPLIT_NAMES:
        test = root / name
        if test.is_dir() and any(p.is_dir() for p in test.iterdir()):
            return train, test
    return None


def _imagefolder_source(root: Path) -> Optional[ImageSplits]:
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


def _hf_splits(dsdict: Any, origin: str, image_column: Optional[str], label_column: Optional[str]) -> ImageSplits:
    names = list(dsdict.keys())
    train_name = "train" if "train" in names else None
    test_name = next((n for n in _TEST_SPLIT_NAMES if n in names), None)
    if train_name is None or test_name is None:
        raise ValueError(f"{origin} has splits {names}; need 'train' and one of {list(_TEST_SPLIT_NAMES)}.")
    train = HFSource(dsdict[train_name], image_column, label_column)
    test = HFSource(dsdict[test_name], image_column, label_column)
    return ImageSplits(train, test, train.class_names(), f"{origin} (splits {train_name}/{test_name})")


def _hf_disk_source(root: Path, image_column: Optional[str], label_column: Optional[str]) -> Optional[ImageSplits]:
    if (root / "dataset_dict.json").is_file():
        import datasets

        return _hf_splits(datasets.load_from_disk(str(root)), f"HF save_to_disk folder {root}", image_column,
                          label_column)
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        raise ValueError(f"{root} holds a single HF Dataset without splits; save a DatasetDict with 'train' and "
                         f"'test' splits (DatasetDict(train=..., test=...).save_to_disk(...)).")
    return None


def _parquet_source(root: Path, image_column: Optional[str], label_column: Optional[str]) -> Optional[ImageSplits]:
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        return None
    import datasets

    def split_of(path: Path) -> Optional[str]:
        rel = path.relative_to(root).as_posix().lower()
        for split in ("train",) + _TEST_SPLIT_NAMES:
            # the hub's conventions: data/train-00000-of-00001.parquet, train/xxx.parquet, train.parquet
            parts = rel.replace("-", "/").replace("_", "/").replace(".", "/").split("/")
            if split in parts:
                return split
        return None

    data_files: dict[str, list[str]] = {}
    for p in files:
        split = split_of(p)
        if split is not None:
            data_files.setdefault(split, []).append(str(p))
    if "train" not in data_files:
        raise ValueError(f"{root} has parquet files but none is named for a 'train' split "
                         f"(expected e.g. train-00000.parquet or train/*.parquet): {[p.name for p in files[:5]]}")
    dsdict = datasets.load_dataset("parquet", data_files=data_files)
    return _hf_splits(dsdict, f"parquet files in {root}", image_column, label_column)


def _hub_source(hub_id: str, image_column: Optional[str], label_column: Optional[str]) -> ImageSplits:
    import datasets

    try:
        dsdict = datasets.load_dataset(hub_id)
    except Exception as e:  # network down, gated, unknown id: say what to do instead
        raise DatasetNotFoundError(
            f"Could not load the HF hub dataset {hub_id!r}: {type(e).__name__}: {e}\n"
            f"Without network, use a copy on disk: on a connected machine run "
            f"`datasets.load_dataset({hub_id!r}).save_to_disk(PATH)` and pass --data-dir PATH, or set "
            f"HF_DATASETS_OFFLINE=1 to read the local cache only.") from e
    return _hf_splits(dsdict, f"HF hub dataset {hub_id}", image_column, label_column)


def _local_generic_source(root: Path, image_column: Optional[str], label_column: Optional[str]) -> Optional[ImageSplits]:
    """A local folder in any dataset-agnostic format: HF save_to_disk, parquet, class folders."""
    if not root.is_dir():
        return None
    for loader in (lambda: _hf_disk_source(root, image_column, label_column), lambda: _imagefolder_source(root),
                   lambda: _parquet_source(root, image_column, label_column)):
        found = loader()
        if found is not None:
            return found
    return None


def _named_source(name: str, root: Path, image_column: Optional[str], label_column: Optional[str]
                  ) -> Optional[ImageSplits]:
    """Try the torchvision-format layout of ``name`` at ``root``, then the generic formats."""
    if not root.exists():
        return None
    found: Optional[ImageSplits] = None
    if name in ("cifar10", "cifar100"):
        found = _cifar_source(root, hundred=name == "cifar100")
    elif name == "svhn":
        found = _svhn_source(root)
    elif name == "stl10":
        found = _stl10_source(root)
    elif name in ("mnist", "fashion_mnist"):
        found = _mnist_like_source(root, "FashionMNIST" if name == "fashion_mnist" else "MNIST", name)
        if found is not None and name == "fashion_mnist":
            found.classes = list(_FASHION_CLASSES)
        elif found is not None:
            found.classes = [str(i) for i in range(10)]
    if found is None:
        found = _local_generic_source(root, image_column, label_column)
    return found


def _search_roots(name: str, data_dir: Optional[str]) -> list[Path]:
    """Where a named dataset is looked for, most specific first."""
    if data_dir:
        base = [Path(data_dir).expanduser()]
    else:
        base = []
        if os.environ.get(DATA_DIR_ENV):
            base.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
        base.append(Path("data"))  # ./data, relative to the working directory (torchvision's habit)
    roots: list[Path] = []
    for b in base:
        roots += [b, b / name, b / name.replace("_", "-")]
    if not data_dir and name == "fashion_mnist":
        roots.append(Path("/usr/share/datasets/fashion-mnist"))  # Debian package dataset-fashion-mnist
    if not data_dir and name == "mnist":
        roots.append(Path("/usr/share/datasets/mnist"))
    seen: set[str] = set()
    return [r for r in roots if not (str(r) in seen or seen.add(str(r)))]


def _is_hub_id(text: str) -> bool:
    """Only an explicit ``hf-hub:`` prefix means the hub: a mistyped local path must not turn into a
    network request (which, offline, retries for half a minute before failing)."""
    return text.startswith("hf-hub:")


def load_image_sources(
    dataset: Optional[str] = None,
    data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> ImageSplits:
    """Resolve ``dataset`` (+ ``data_dir``) to train and test image sources, without transforms.

    ``dataset`` is a built-in name (see :func:`list_datasets`), a local folder, or an HF hub id
    (``hf-hub:owner/name``); ``None`` means :data:`DEFAULT_DATASET`. For a named
    dataset, ``data_dir`` is where its files are (any supported format, or ``hf-hub:ID``); without it
    ``$TIMM_LOCAL_DATA_DIR`` and ``./data`` are searched. Never downloads unless given a hub id.
    """
    dataset = dataset or DEFAULT_DATASET
    key = _normalise_name(dataset)
    if key in _RECIPES:
        recipe = _RECIPES[key]
        if key == "digits" and not data_dir:
            splits = _digits_source()
        elif data_dir and data_dir.startswith("hf-hub:"):
            splits = _hub_source(data_dir[len("hf-hub:"):], image_column, label_column)
        else:
            roots = _search_roots(key, data_dir)
            splits = None
            for root in roots:
                splits = _named_source(key, root, image_column, label_column)
                if splits is not None:
                    break
            if splits is None:
                looked = "\n  ".join(str(r.resolve()) for r in roots)
                raise DatasetNotFoundError(
                    f"Dataset {key!r} not found. Looked in:\n  {looked}\n"
                    f"To provide it: {recipe.how_to_get} and pass --data-dir DATA_DIR (or set ${DATA_DIR_ENV}).\n"
                    f"Also accepted in DATA_DIR: an HF save_to_disk folder, parquet files, or train/ + test/ class "
                    f"folders. Or name a hub copy explicitly: --data-dir hf-hub:{(recipe.hub_ids or ('OWNER/NAME',))[0]} "
                    f"(needs network). Nothing is downloaded automatically.")
        splits.recipe = recipe
        return splits
    if Path(dataset).expanduser().exists():
        root = Path(dataset).expanduser()
        splits = _local_generic_source(root, image_column, label_column)
        if splits is None:
            # a torchvision root whose layout names the dataset (MNIST and Fashion-MNIST IDX files look
            # alike, so those need the name)
            for name in ("cifar10", "cifar100", "svhn", "stl10"):
                splits = _named_source(name, root, image_column, label_column)
                if splits is not None:
                    splits.recipe = _RECIPES[name]
                    return splits
        if splits is None:
            raise DatasetNotFoundError(
                f"{root} exists but is not a dataset in a supported layout. Supported: train/ + test/ (or val/) "
                f"sub-folders with one folder of images per class; an HF save_to_disk folder (dataset_dict.json); "
                f"parquet files named for their split (train-*.parquet, test-*.parquet); or a built-in dataset name "
                f"({', '.join(list_datasets())}) with --data-dir.")
        return splits
    if _is_hub_id(dataset):
        hub_id = dataset[len("hf-hub:"):]
        splits = _hub_source(hub_id, image_column, label_column)
        for recipe in _RECIPES.values():
            if hub_id in recipe.hub_ids:
                splits.recipe = recipe
        return splits
    raise DatasetNotFoundError(
        f"Unknown dataset {dataset!r}: not a built-in name ({', '.join(list_datasets())}) and no such folder "
        f"({Path(dataset).expanduser().resolve()}). For a Hugging Face hub dataset write hf-hub:OWNER/NAME.")


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------
def _expand_stats(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Adapt per-channel statistics to the model's channel count (grayscale replicated to RGB, or averaged)."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (float(np.mean(values)),)
    raise ValueError(f"Cannot adapt {len(values)}-channel statistics to {in_chans} channels")


def build_transform(recipe: DatasetRecipe, image_size: int, in_chans: int, is_training: bool, augment: bool = True,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Callable:
    """The paper's transform for ``recipe`` at ``image_size``, producing ``in_chans`` normalised channels.

    Grayscale images become 3 identical channels when the model wants 3 (PIL ``convert("RGB")``), which
    is also why the dataset's 1-channel mean/std are replicated.
    """
    from torchvision import transforms as T

    mean = _expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std = _expand_stats(std if std is not None else recipe.std, in_chans)
    mode = "RGB" if in_chans == 3 else "L" if in_chans == 1 else None
    if mode is None:
        raise ValueError(f"in_chans must be 1 or 3 for image datasets, got {in_chans}")
    convert = T.Lambda(_ConvertMode(mode))

    if recipe.train_style == "imagenet":
        from timm.data import create_transform

        tf = create_transform(
            input_size=(in_chans, image_size, image_size), is_training=is_training and augment,
            color_jitter=None,  # the paper uses random-resized crop + flip only
            interpolation=recipe.interpolation, mean=mean, std=std, crop_pct=recipe.crop_pct,
        )
        return T.Compose([convert, tf])

    steps: list[Callable] = [convert]
    if image_size != recipe.image_size or recipe.name not in _RECIPES:
        # unknown (or resized) datasets: bring every image to the model's input size first
        steps += [T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(image_size)]
    elif recipe.name == "digits":
        steps.append(T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR))
    if is_training and augment:
        pad = max(1, round(recipe.pad * image_size / recipe.image_size))
        steps.append(T.RandomCrop(image_size, padding=pad))
        if recipe.hflip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class _ConvertMode:
    """Picklable ``img.convert(mode)`` (lambdas do not survive DataLoader worker spawning)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Run a block under torch/python RNGs seeded with ``seed``, restoring the outer states afterwards.

    torchvision transforms draw from torch's global RNG and timm's from python's ``random``; isolating
    them makes augmentation independent of worker count, resume position, and the training RNG.
    """
    torch_state = torch.random.get_rng_state()
    py_state = random.getstate()
    torch.random.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(py_state)


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``source[i]`` with an RNG seeded by ``(seed, epoch, i)``.

    Call :meth:`set_epoch` before each epoch (the training loop does) so that epochs differ.
    """

    def __init__(self, source: ImageSource, transform: Callable, seed: int = 0, epoch: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def sample_seed(self, index: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.source[index]
        with _isolated_rng(self.sample_seed(index)):
            return self.transform(img), label


# ----------------------------------------------------------------------------------------------
# The one call the training loop makes
# ----------------------------------------------------------------------------------------------
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
) -> tuple[SeededTransformDataset, SeededTransformDataset, DataConfig]:
    """Build the transformed train and test datasets of a run and describe them.

    ``image_size`` defaults to the dataset's own (32 for CIFAR, 96 for STL-10, ...); ``in_chans`` is
    what the model wants. ``num_classes`` may exceed the labels found (never fall short of them).
    """
    splits = load_image_sources(dataset, data_dir, image_column, label_column)
    found_classes = _num_classes_of(splits)
    if num_classes is not None and num_classes < found_classes:
        raise ValueError(f"num_classes={num_classes} but the dataset has {found_classes} classes ({splits.origin}).")
    recipe = splits.recipe
    if recipe is None:
        first, _ = splits.train[0]
        native_chans = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
        recipe = _generic_recipe(str(dataset), image_size or max(first.size), native_chans, found_classes)
    size = int(image_size or recipe.image_size)
    mean_ = _expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std_ = _expand_stats(std if std is not None else recipe.std, in_chans)
    train = SeededTransformDataset(splits.train, build_transform(recipe, size, in_chans, True, augment, mean_, std_),
                                   seed=seed)
    test = SeededTransformDataset(splits.test, build_transform(recipe, size, in_chans, False, augment, mean_, std_),
                                  seed=seed)
    cfg = DataConfig(
        dataset=recipe.name if recipe.name in _RECIPES else str(dataset), origin=splits.origin,
        num_classes=int(num_classes or found_classes), classes=splits.classes, image_size=size, in_chans=in_chans,
        native_in_chans=recipe.in_chans, mean=mean_, std=std_, crop_pct=recipe.crop_pct,
        interpolation=recipe.interpolation, train_size=len(train), test_size=len(test), augment=augment,
        recipe=recipe.name if recipe.name in _RECIPES else "generic",
    )
    return train, test, cfg
