"""timm's transform knobs reach the training transform: ImageNet-style data through create_transform, the
paper's pad-and-crop data with the same timm pieces around its own crop; evaluation never augments."""
from __future__ import annotations

import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from timm_local.cli import parse_config
from timm_local.data.recipes import get_recipe
from timm_local.data.transforms import build_transform
from timm_local.training import run_datasets
from timm_local.training.builders import augmentation_options

KNOBS = ["--aa", "rand-m9-mstd0.5", "--reprob", "1.0", "--remode", "const", "--color-jitter", "0.4"]


def flattened(tf) -> list:
    found = []
    for t in getattr(tf, "transforms", [tf]):
        found += flattened(t) if hasattr(t, "transforms") else [t]
    return found


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_knobs_reach_the_training_transform_only(dataset):
    extra = augmentation_options(parse_config(KNOBS))
    recipe = get_recipe(dataset)
    train = flattened(build_transform(recipe, 32, 3, True, extra=extra))
    erasing = [t for t in train if isinstance(t, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].probability == 1.0 and erasing[0].mode == "const"
    assert any(isinstance(t, RandAugment) for t in train)
    test = flattened(build_transform(recipe, 32, 3, False, extra=extra))
    assert not any(isinstance(t, (RandomErasing, RandAugment)) for t in test)


def test_random_erasing_changes_the_training_images():
    plain = parse_config(["--dataset", "digits", "--image-size", "16"])
    erased = parse_config(["--dataset", "digits", "--image-size", "16", "--reprob", "1.0", "--remode", "const"])
    (a, _, _), (b, _, data) = run_datasets(plain), run_datasets(erased)
    xa, xb = a[0][0], b[0][0]
    zero = torch.tensor(0.0)
    assert not torch.equal(xa, xb) and ((xb == zero).all(0) & (xa != xb).any(0)).any()  # an erased (zero) patch


def test_crop_pct_and_interpolation_override_the_datasets():
    cfg = parse_config(["--dataset", "digits", "--image-size", "16", "--crop-pct", "0.875",
                        "--interpolation", "bicubic"])
    _, _, data = run_datasets(cfg)
    assert data.crop_pct == 0.875 and data.interpolation == "bicubic"
