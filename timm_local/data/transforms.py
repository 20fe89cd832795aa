"""The paper's transforms per dataset (AUGLOCAL.md §5), producing the channel count the model wants."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .recipes import RECIPES, DatasetRecipe

__all__ = ["ConvertMode", "build_transform", "expand_stats"]


def expand_stats(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
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
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    normalize: bool = True) -> Callable:
    """The paper's transform for ``recipe`` at ``image_size``, producing ``in_chans`` normalised channels.

    Grayscale images become 3 identical channels when the model wants 3 (PIL ``convert("RGB")``), which
    is also why the dataset's 1-channel mean/std are replicated. ``normalize=False`` stops at the uint8
    tensor (timm's ``use_prefetcher`` output): a quarter of the bytes through worker queues and the host-to-GPU
    copy, with the float conversion and normalisation done on the device
    (:class:`~timm_local.data.device_loader.DeviceBatches`, the same arithmetic).
    """
    from torchvision import transforms as T

    mean = expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std = expand_stats(std if std is not None else recipe.std, in_chans)
    mode = "RGB" if in_chans == 3 else "L" if in_chans == 1 else None
    if mode is None:
        raise ValueError(f"in_chans must be 1 or 3 for image datasets, got {in_chans}")
    convert = T.Lambda(ConvertMode(mode))

    if recipe.train_style == "imagenet":
        from timm.data import create_transform

        tf = create_transform(
            input_size=(in_chans, image_size, image_size), is_training=is_training and augment,
            color_jitter=None,  # the paper uses random-resized crop + flip only
            interpolation=recipe.interpolation, mean=mean, std=std, crop_pct=recipe.crop_pct,
            use_prefetcher=not normalize,
        )
        return T.Compose([convert, tf])

    steps: list[Callable] = [convert]
    if image_size != recipe.image_size or recipe.name not in RECIPES:
        # unknown (or resized) datasets: bring every image to the model's input size first
        steps += [T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(image_size)]
    elif recipe.name == "digits":
        steps.append(T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR))
    if is_training and augment:
        pad = max(1, round(recipe.pad * image_size / recipe.image_size))
        steps.append(T.RandomCrop(image_size, padding=pad))
        if recipe.hflip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()]
    return T.Compose(steps)


class ConvertMode:
    """Picklable ``img.convert(mode)`` (lambdas do not survive DataLoader worker spawning)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)
