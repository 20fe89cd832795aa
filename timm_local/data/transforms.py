"""The paper's transforms per dataset (docs/spec.md §5), producing the channel count the model wants."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from .recipes import RECIPES, DatasetRecipe

__all__ = ["build_transform", "expand_stats"]


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
                    normalize: bool = True, extra: Optional[Mapping[str, Any]] = None) -> Callable:
    """The paper's transform for ``recipe`` at ``image_size``, producing ``in_chans`` normalised channels.

    Grayscale images become 3 identical channels when the model wants 3 (PIL ``convert("RGB")``), which
    is also why the dataset's 1-channel mean/std are replicated. ``normalize=False`` stops at the uint8
    tensor (timm's ``use_prefetcher`` output): a quarter of the bytes through worker queues and the host-to-GPU
    copy, with the float conversion and normalisation done on the device
    (:class:`~timm_local.data.device_loader.DeviceBatches`, the same arithmetic). ``extra`` holds a recipe's
    ``timm.data.create_transform`` knobs (``auto_augment``, ``re_prob``, ``re_mode``, ``re_count``,
    ``color_jitter``): ImageNet-style data passes them to ``create_transform``; pad-and-crop data adds the
    same timm pieces around its own crop (:func:`_timm_augmentations`).
    """
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    if extra.get("re_prob") and not normalize and is_training and augment:  # timm would leave it to its prefetcher
        raise ValueError("random erasing (--reprob) works on normalised images, and this run normalises on the "
                         "device: add --no-device-normalize")
    from torchvision import transforms as T

    mean = expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std = expand_stats(std if std is not None else recipe.std, in_chans)
    mode = "RGB" if in_chans == 3 else "L" if in_chans == 1 else None
    if mode is None:
        raise ValueError(f"in_chans must be 1 or 3 for image datasets, got {in_chans}")
    convert = T.Lambda(_ConvertMode(mode))

    if recipe.train_style == "imagenet":
        from timm.data import create_transform

        train = is_training and augment
        tf = create_transform(
            input_size=(in_chans, image_size, image_size), is_training=train,
            interpolation=recipe.interpolation, mean=mean, std=std, crop_pct=recipe.crop_pct,
            use_prefetcher=not normalize,
            **{"color_jitter": None, **(extra if train else {})},  # the paper: random-resized crop + flip only
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
    before, after = _timm_augmentations(extra, image_size, mean) if is_training and augment else ([], [])
    steps += [*before, T.ToTensor(), T.Normalize(mean, std), *after] if normalize else [*before, T.PILToTensor()]
    return T.Compose(steps)


def _timm_augmentations(extra: Mapping[str, Any], image_size: int, mean: Sequence[float]
                       ) -> tuple[list[Callable], list[Callable]]:
    """timm's auto-augment / colour jitter (on the image) and random erasing (on the tensor) for data whose
    crop is the paper's pad-and-crop.

    Why not ``create_transform``: its training transform always starts with a random-resized crop, which is
    not the CIFAR/SVHN/STL-10 recipe. The policy choice below is the one of timm's ``transforms_imagenet_train``.
    """
    from torchvision import transforms as T
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    before: list[Callable] = []
    policy = extra.get("auto_augment")
    if policy:
        params = {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean)}
        if policy.startswith("rand"):
            before.append(rand_augment_transform(policy, params))
        elif policy.startswith("augmix"):
            before.append(augment_and_mix_transform(policy, {**params, "translate_pct": 0.3}))
        else:
            before.append(auto_augment_transform(policy, params))
    elif extra.get("color_jitter"):  # timm applies colour jitter only without an auto-augment policy
        before.append(T.ColorJitter(*(float(extra["color_jitter"]),) * 3))
    after: list[Callable] = []
    if extra.get("re_prob"):
        after.append(RandomErasing(extra["re_prob"], mode=extra.get("re_mode", "pixel"),
                                   max_count=extra.get("re_count", 1), device="cpu"))
    return before, after


class _ConvertMode:
    """Picklable ``img.convert(mode)`` (lambdas do not survive DataLoader worker spawning)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)
