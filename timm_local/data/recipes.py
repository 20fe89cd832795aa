"""What the paper (or, where it is silent, we) use per named dataset: a table of recipes.

A recipe holds everything dataset-specific a run needs besides the pixels: class count and names,
default input size, native channels, mean/std, the training augmentation family, and which on-disk
reader understands the dataset's own (torchvision) layout. Adding a dataset is adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..registry import Registry

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "DEFAULT_DATASET", "DatasetRecipe", "IMAGENET_MEAN", "IMAGENET_STD",
           "RECIPES", "generic_recipe", "get_recipe", "list_datasets", "normalise_name"]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # docs/spec.md §5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetRecipe:
    """Everything dataset-specific a run needs besides the pixels.

    ``train_style`` picks the augmentation family: ``"pad_crop"`` = pad ``pad`` pixels + random crop
    back to the input size (+ horizontal flip if ``hflip``), i.e. the CIFAR/SVHN/STL-10 recipe of the
    paper; ``"imagenet"`` = timm's random-resized crop + flip for training and resize + center crop
    (``crop_pct``) for evaluation. ``reader`` names the reader of the dataset's own on-disk layout
    (:data:`timm_local.data.readers.READERS`; empty: generic formats only); a ``bundled`` dataset ships
    with a dependency and needs no ``data_dir``. ``classes`` names the labels where the files do not.
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
    reader: str = ""
    bundled: bool = False
    classes: Optional[tuple[str, ...]] = None
    system_dirs: tuple[str, ...] = ()  # where an OS package installs the files (searched without data_dir)


_DIGITS = tuple(str(i) for i in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")

_ALIASES = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100", "stl_10": "stl10",
            "imagenet1k": "imagenet", "imagenet_1k": "imagenet"}


def normalise_name(name: str) -> str:
    """The table key of a dataset name as users write it (``Fashion-MNIST``, ``cifar-10``, ...)."""
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _unknown_dataset(name: str, known: list[str]) -> KeyError:
    return KeyError(f"Unknown dataset {name!r}. Known datasets: {', '.join(known)}; or give a local "
                    f"folder / HF hub id.")


RECIPES: Registry[str, DatasetRecipe] = Registry(_unknown_dataset, normalise=normalise_name, entries=(
    (r.name, r)
    for r in [
        DatasetRecipe(
            "cifar10", 10, 32, 3, CIFAR_MEAN, CIFAR_STD, pad=4, hflip=True, reader="cifar10",
            hub_ids=("uoft-cs/cifar10", "cifar10"),
            how_to_get="extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                       "DATA_DIR/cifar-10-batches-py/ exists",
        ),
        DatasetRecipe(
            # CIFAR-100 statistics (train set); the paper gives CIFAR-10's only.
            "cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4, hflip=True,
            reader="cifar100", hub_ids=("uoft-cs/cifar100", "cifar100"),
            how_to_get="extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                       "DATA_DIR/cifar-100-python/ exists",
        ),
        DatasetRecipe(
            # Paper: pad 2 + random 32 crop, no flip (digits are not mirror-symmetric).
            "svhn", 10, 32, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), pad=2, hflip=False,
            reader="svhn", classes=_DIGITS, hub_ids=("ufldl-stanford/svhn",),
            how_to_get="put train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) in DATA_DIR",
        ),
        DatasetRecipe(
            # Paper: 96x96, 4-pixel random translation + flip == pad 4 + random 96 crop + flip.
            "stl10", 10, 96, 3, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), pad=4, hflip=True,
            reader="stl10", hub_ids=("tanganke/stl10",),
            how_to_get="extract stl10_binary.tar.gz (https://cs.stanford.edu/~acoates/stl10/) so that "
                       "DATA_DIR/stl10_binary/ exists (unlabeled_X.bin is not needed)",
        ),
        DatasetRecipe(
            "imagenet", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD, train_style="imagenet", crop_pct=0.875,
            hub_ids=("ILSVRC/imagenet-1k",),
            how_to_get="arrange ImageNet-1k as DATA_DIR/train/<wnid>/*.JPEG and DATA_DIR/val/<wnid>/*.JPEG "
                       "(the usual image-folder layout), or save the HF dataset ILSVRC/imagenet-1k with "
                       "save_to_disk",
        ),
        DatasetRecipe(
            # Not in the paper. Small translations + flip (clothes are roughly mirror-symmetric).
            "fashion_mnist", 10, 28, 1, (0.2860,), (0.3530,), pad=2, hflip=True, reader="fashion_mnist",
            classes=_FASHION_CLASSES, system_dirs=("/usr/share/datasets/fashion-mnist",),
            hub_ids=("zalando-datasets/fashion_mnist", "fashion_mnist"),
            how_to_get="put the four IDX files (train-images-idx3-ubyte[.gz], ...; Debian/Ubuntu: "
                       "`apt-get install dataset-fashion-mnist`) in DATA_DIR",
        ),
        DatasetRecipe(
            # Not in the paper. Small translations, no flip.
            "mnist", 10, 28, 1, (0.1307,), (0.3081,), pad=2, hflip=False, reader="mnist", classes=_DIGITS,
            system_dirs=("/usr/share/datasets/mnist",), hub_ids=("ylecun/mnist", "mnist"),
            how_to_get="put the four IDX files (train-images-idx3-ubyte[.gz], ...; http://yann.lecun.com/exdb/mnist/) "
                       "in DATA_DIR",
        ),
        DatasetRecipe(
            # scikit-learn's 8x8 digits (1797 images, ships with scikit-learn): the default dataset, so a run
            # works on real data with no download. Upsampled to 32x32 so CIFAR-style networks fit;
            # mean/std measured on the upsampled images. Fixed stratified 80/20 split (seed 0).
            "digits", 10, 32, 1, (0.3053,), (0.3236,), pad=2, hflip=False, reader="digits", bundled=True,
            how_to_get="install scikit-learn (`pip install scikit-learn`); the data ships with it",
        ),
    ]
))

#: The dataset used when none is given: real, tiny, and shipped with a dependency.
DEFAULT_DATASET = "digits"


def list_datasets() -> list[str]:
    """Names of the datasets that have a built-in recipe (transforms, mean/std, loaders)."""
    return RECIPES.names()


def get_recipe(name: str) -> DatasetRecipe:
    """Return the recipe of a named dataset; unknown names get an error listing the known ones."""
    return RECIPES.lookup(name)


def generic_recipe(name: str, image_size: int, in_chans: int, num_classes: Optional[int]) -> DatasetRecipe:
    """Recipe for a dataset we know nothing about: ImageNet statistics, CIFAR-style aug when small."""
    small = image_size <= 64
    return DatasetRecipe(
        name=name, num_classes=num_classes, image_size=image_size, in_chans=in_chans,
        mean=IMAGENET_MEAN if in_chans == 3 else (0.5,), std=IMAGENET_STD if in_chans == 3 else (0.5,),
        train_style="pad_crop" if small else "imagenet", pad=max(1, image_size // 8), hflip=True,
        crop_pct=1.0 if small else 0.875,
    )
