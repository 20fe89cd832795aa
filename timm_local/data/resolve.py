"""From a dataset name, folder or hub id to train/test image sources: one resolution path for every format.

A named dataset is looked for in its search roots (``--data-dir``, else ``$TIMM_LOCAL_DATA_DIR`` and
``./data``, each also with a ``<name>/`` sub-folder, then where an OS package installs it); at each root
its own reader (the recipe's) is tried first, then the generic formats. **Nothing is ever downloaded**
unless the user names the hub explicitly (``hf-hub:OWNER/NAME``): a machine without network never hangs
on a download attempt, and a missing dataset raises :class:`DatasetNotFoundError` listing every place
searched and how to provide the files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .readers import BUNDLED_READERS, GENERIC_READERS, READERS, read_hub
from .recipes import DEFAULT_DATASET, RECIPES, DatasetRecipe, list_datasets, normalise_name
from .sources import HUB_PREFIX, DatasetNotFoundError, ImageSplits
from .streams import MAP_PREFIXES, read_timm_map, spec_prefix

__all__ = ["DATA_DIR_ENV", "HUB_PREFIX", "load_image_sources", "search_roots"]

#: Environment variable naming a root folder that holds datasets (searched for named datasets).
DATA_DIR_ENV = "TIMM_LOCAL_DATA_DIR"


def search_roots(name: str, data_dir: Optional[str] = None) -> list[Path]:
    """Where named dataset ``name`` is looked for, most specific first."""
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
    recipe = RECIPES.get(name)
    if not data_dir and recipe is not None:
        roots += [Path(d) for d in recipe.system_dirs]
    seen: set[str] = set()
    return [r for r in roots if not (str(r) in seen or seen.add(str(r)))]


def _generic(root: Path, image_column: Optional[str], label_column: Optional[str]) -> Optional[ImageSplits]:
    if not root.is_dir():
        return None
    for reader in GENERIC_READERS:
        found = reader(root, image_column, label_column)
        if found is not None:
            return found
    return None


def _at_root(recipe: DatasetRecipe, root: Path, image_column: Optional[str], label_column: Optional[str]
             ) -> Optional[ImageSplits]:
    """The recipe's own layout at ``root``, then the generic formats."""
    if not root.exists():
        return None
    if recipe.reader in READERS:
        found = READERS[recipe.reader](root)
        if found is not None:
            if found.classes is None and recipe.classes is not None:
                found.classes = list(recipe.classes)
            return found
    return _generic(root, image_column, label_column)


def _named(recipe: DatasetRecipe, data_dir: Optional[str], image_column: Optional[str],
           label_column: Optional[str]) -> ImageSplits:
    if recipe.bundled and not data_dir:
        return BUNDLED_READERS[recipe.reader]()
    if data_dir and data_dir.startswith(HUB_PREFIX):
        return read_hub(data_dir[len(HUB_PREFIX):], image_column, label_column)
    roots = search_roots(recipe.name, data_dir)
    for root in roots:
        splits = _at_root(recipe, root, image_column, label_column)
        if splits is not None:
            return splits
    looked = "\n  ".join(str(r.resolve()) for r in roots)
    raise DatasetNotFoundError(
        f"Dataset {recipe.name!r} not found. Looked in:\n  {looked}\n"
        f"To provide it: {recipe.how_to_get} and pass --data-dir DATA_DIR (or set ${DATA_DIR_ENV}).\n"
        f"Also accepted in DATA_DIR: an HF save_to_disk folder, parquet files, or train/ + test/ class "
        f"folders. Or name a hub copy explicitly: --data-dir {HUB_PREFIX}{(recipe.hub_ids or ('OWNER/NAME',))[0]} "
        f"(needs network). Nothing is downloaded automatically.")


def _folder(root: Path, image_column: Optional[str], label_column: Optional[str]) -> ImageSplits:
    splits = _generic(root, image_column, label_column)
    if splits is not None:
        return splits
    # a torchvision root whose layout names the dataset (MNIST and Fashion-MNIST IDX files look alike, so
    # those need the name)
    for name in ("cifar10", "cifar100", "svhn", "stl10"):
        splits = READERS[RECIPES[name].reader](root)
        if splits is not None:
            splits.recipe = RECIPES[name]
            return splits
    raise DatasetNotFoundError(
        f"{root} exists but is not a dataset in a supported layout. Supported: train/ + test/ (or val/) "
        f"sub-folders with one folder of images per class; an HF save_to_disk folder (dataset_dict.json); "
        f"parquet files named for their split (train-*.parquet, test-*.parquet); or a built-in dataset name "
        f"({', '.join(list_datasets())}) with --data-dir.")


def load_image_sources(
    dataset: Optional[str] = None,
    data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> ImageSplits:
    """Resolve ``dataset`` (+ ``data_dir``) to train and test image sources, without transforms.

    ``dataset`` is a built-in name (see :func:`~timm_local.data.list_datasets`), a local folder, an HF
    hub id (``hf-hub:owner/name``) or timm's map-style spec ``hfds/NAME`` (``data_dir``: its cache folder);
    ``None`` means the default dataset. For a named dataset, ``data_dir`` is where its files are (any
    supported format, or ``hf-hub:ID``); without it ``$TIMM_LOCAL_DATA_DIR`` and ``./data`` are searched.
    Never downloads unless given a hub id (``hfds/`` names one too, as timm does).
    """
    dataset = dataset or DEFAULT_DATASET
    if spec_prefix(dataset) in MAP_PREFIXES:
        return read_timm_map(dataset, data_dir, image_column, label_column)
    key = normalise_name(dataset)
    if key in RECIPES:
        splits = _named(RECIPES[key], data_dir, image_column, label_column)
        splits.recipe = RECIPES[key]
        return splits
    if Path(dataset).expanduser().exists():
        return _folder(Path(dataset).expanduser(), image_column, label_column)
    if dataset.startswith(HUB_PREFIX):
        hub_id = dataset[len(HUB_PREFIX):]
        splits = read_hub(hub_id, image_column, label_column)
        splits.recipe = next((r for r in RECIPES.values() if hub_id in r.hub_ids), None)
        return splits
    raise DatasetNotFoundError(
        f"Unknown dataset {dataset!r}: not a built-in name ({', '.join(list_datasets())}) and no such folder "
        f"({Path(dataset).expanduser().resolve()}). For a Hugging Face hub dataset write hf-hub:OWNER/NAME.")
