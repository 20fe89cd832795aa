"""timm_local: supervised local learning (AugLocal and baselines) for timm CNNs.

Importing the package registers our CIFAR architectures in timm's model registry, the family
adapters and the local learning methods.

``__all__`` is what a user's script needs (README, "Python API"): build a local model, train a config,
export and reload the backbone, and register a new rule or family. Everything else lives in the
subpackages, each with its own ``__all__`` for those who extend the library; names with a leading
underscore are internal to their module.
"""
from . import models  # noqa: F401  (registers *_cifar models in timm)
from .families import FamilyAdapter, list_families, register_family
from .methods import LocalHead, LocalMethod, LocalStage, create_method, list_methods, register_method
from .model import LocalModel, create_local_model
from .partition import BlockSpec, Partition, partition
from .config import TrainConfig
from .data import create_datasets, list_datasets
from .errors import UserError
from .export import export_backbone, load_exported
from .training import train
from .version import __version__


__all__ = [
    "BlockSpec",
    "TrainConfig",
    "UserError",
    "create_datasets",
    "export_backbone",
    "list_datasets",
    "load_exported",
    "train",
    "FamilyAdapter",
    "LocalHead",
    "LocalMethod",
    "LocalModel",
    "LocalStage",
    "Partition",
    "create_local_model",
    "create_method",
    "list_families",
    "list_methods",
    "partition",
    "register_family",
    "register_method",
]
