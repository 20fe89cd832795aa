"""Which input size (and preprocessing) a dataset without a recipe is trained at, and why.

A timm model carries its own input size, crop fraction, interpolation and mean/std in ``pretrained_cfg``;
timm's ``resolve_model_data_config`` reads them. For a folder of ImageNet-like photos that is the size a
user means (224 for a ResNet), not the size of the files (500 px for ImageNet: five times the compute).
The files' own size is used only where the model has no such default, or is one of ours (``*_cifar``:
built for whatever small images it is given). ``--img-size`` overrides the size in every case.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image

from .sources import CorruptImageError, ImageSource

__all__ = ["SAMPLE_SIZE", "ModelInput", "model_input", "sample_file_sizes", "sample_indices"]

#: Files opened and verified at start-up: enough to catch a wrong folder or a broken copy, and the same
#: number for a thousand files or for ImageNet's 1.28 million (start-up never depends on the dataset's size).
SAMPLE_SIZE = 64


@dataclass(frozen=True)
class ModelInput:
    """A model's preprocessing defaults (timm's data config) and the model they came from."""

    model: str
    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_input(model: Optional[str], model_kwargs: Optional[dict[str, Any]] = None) -> Optional[ModelInput]:
    """``timm.data.resolve_model_data_config`` of ``model``, or None for our ``*_cifar`` models, models with
    no ``input_size`` default, and names timm cannot build (the model builder reports those).

    The model is built on the meta device: no memory, no weights, but ``model_kwargs`` that change the
    input (a ViT's ``img_size``) are honoured.
    """
    if not model or model.endswith("_cifar"):
        return None
    import timm
    import torch
    from timm.data import resolve_model_data_config

    try:
        with torch.device("meta"):
            net = timm.create_model(model, **dict(model_kwargs or {}))
    except (RuntimeError, ValueError, TypeError, KeyError):
        return None
    if not (getattr(net, "pretrained_cfg", None) or {}).get("input_size"):
        return None
    cfg = resolve_model_data_config(net)
    return ModelInput(model=model, image_size=int(cfg["input_size"][-1]), crop_pct=float(cfg["crop_pct"]),
                      interpolation=str(cfg["interpolation"]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def sample_indices(n: int, seed: int = 0, sample: int = SAMPLE_SIZE) -> list[int]:
    """The sorted indices of a seeded sample of ``sample`` of ``n`` items (all of them when ``n`` is smaller)."""
    return sorted(random.Random(seed).sample(range(n), min(sample, n)))


def sample_file_sizes(source: ImageSource, seed: int = 0, sample: int = SAMPLE_SIZE) -> Optional[Counter]:
    """``(width, height) -> count`` over a seeded sample of an image-folder source's files, each opened and
    verified (PIL's ``verify`` reads the file without decoding it); None for sources that are not files.

    Why a sample: a wrong folder or a systematically broken copy shows at start, before the run writes
    anything, in constant time. A single bad file elsewhere is still named when it is read
    (:class:`~timm_local.data.sources.TorchvisionSource`).
    """
    samples = getattr(getattr(source, "dataset", None), "samples", None)
    if samples is None:
        return None
    sizes: Counter = Counter()
    for index in sample_indices(len(samples), seed, sample):
        path = samples[index][0]
        try:
            with Image.open(path) as img:
                sizes[img.size] += 1
                img.verify()
        except Exception as e:  # UnidentifiedImageError, truncation, broken chunks: the file is unusable
            raise CorruptImageError(f"{path} is not a readable image ({type(e).__name__}: {e}); replace or remove "
                                    f"the file") from e
    return sizes
