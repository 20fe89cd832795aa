"""Datasets for local-learning runs: named recipes, local folders in every common layout, HF datasets.

What this package guarantees, and why:

* **No silent downloads.** Named datasets (``cifar10``, ``mnist``, ...) are only ever read from
  disk (:mod:`.resolve`); only an explicit hub id (``hf-hub:uoft-cs/cifar10``) reaches the network.
* **One resolution path for every format** (:mod:`.readers`): a torchvision-format root, an HF
  ``save_to_disk`` folder, parquet files or class folders all become the same
  :class:`~.sources.ImageSource` of ``(PIL image, int label)`` pairs.
* **The paper's augmentation per dataset** (:mod:`.recipes`, :mod:`.transforms`), with per-dataset
  mean/std, and grayscale sets expanded to the channel count the model wants.
* **Augmentation is a pure function of (seed, epoch, sample index)** (:mod:`.seeded`), so a resumed
  run sees exactly the images an uninterrupted one sees.

``__all__`` is the surface for a script that builds its own data pipeline (:func:`create_datasets`,
the sources and readers, the recipe table) and for a new reader or recipe (docs/contributing.md).
"""
from .datasets import DataConfig, count_classes, create_datasets
from .device_loader import DeviceBatches, normalize_batch
from .input_size import SAMPLE_SIZE, ModelInput, model_input, sample_file_sizes, sample_indices
from .readers import IDX_STEMS, find_idx, read_idx
from .recipes import DEFAULT_DATASET, RECIPES, DatasetRecipe, get_recipe, list_datasets
from .resolve import DATA_DIR_ENV, HUB_PREFIX, load_image_sources, search_roots
from .seeded import SeededTransformDataset
from .sources import (ArraySource, CorruptImageError, DatasetNotFoundError, HFSource, ImageSource, ImageSplits,
                      TorchvisionSource)
from .streams import HFStream, Stream, TimmSource, spec_prefix
from .transforms import build_transform, expand_stats

__all__ = [
    "ArraySource",
    "CorruptImageError",
    "DATA_DIR_ENV",
    "DEFAULT_DATASET",
    "DataConfig",
    "DatasetNotFoundError",
    "DatasetRecipe",
    "DeviceBatches",
    "HFSource",
    "HFStream",
    "HUB_PREFIX",
    "ModelInput",
    "SAMPLE_SIZE",
    "IDX_STEMS",
    "ImageSource",
    "ImageSplits",
    "RECIPES",
    "SeededTransformDataset",
    "Stream",
    "TimmSource",
    "TorchvisionSource",
    "build_transform",
    "count_classes",
    "create_datasets",
    "expand_stats",
    "find_idx",
    "get_recipe",
    "list_datasets",
    "load_image_sources",
    "model_input",
    "normalize_batch",
    "sample_file_sizes",
    "sample_indices",
    "read_idx",
    "search_roots",
    "spec_prefix",
]
