"""The one call a run makes for its data: transformed train/test sets and a description of them."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .input_size import ModelInput, model_input, sample_file_sizes
from .recipes import RECIPES, DatasetRecipe, generic_recipe
from .resolve import load_image_sources
from .seeded import SeededTransformDataset
from .sources import HFSource, ImageSplits, TorchvisionSource
from .streams import STREAM_PREFIXES, open_streams, spec_prefix
from .transforms import build_transform, expand_stats

__all__ = ["DataConfig", "count_classes", "create_datasets"]

logger = logging.getLogger(__name__)


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
    size_source: str = ""  # what decided image_size (and crop_pct, interpolation), for the start line

    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing entries timm keeps in ``pretrained_cfg`` (used by timm's data config)."""
        return {
            "input_size": (self.in_chans, self.image_size, self.image_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


#: The most images read to count the classes of a source that keeps no label list (a bounded pass).
_LABEL_SCAN_LIMIT = 10_000


def count_classes(splits: ImageSplits) -> int:
    """From the class names, else the stored labels (never decoding an image), else a bounded pass."""
    if splits.classes:
        return len(splits.classes)
    src = splits.train
    labels = getattr(src, "labels", None)
    if labels is None and isinstance(src, HFSource):
        labels = src.label_values()
    if labels is None and isinstance(src, TorchvisionSource):
        labels = getattr(src.dataset, "targets", None) or getattr(src.dataset, "labels", None)
    if labels is None:
        if len(src) > _LABEL_SCAN_LIMIT:
            raise ValueError(f"{splits.origin}: the class count is not stored with the data and finding it would "
                             f"decode all {len(src)} images; pass --num-classes")
        labels = [src[i][1] for i in range(len(src))]
    return int(np.max(np.asarray(labels))) + 1


def _native_image_size(splits: ImageSplits, image_size: Optional[int], seed: int = 0, warn: bool = True
                      ) -> Optional[int]:
    """The input size of a dataset without a recipe from its image files' sizes, over a seeded sample of
    each split (:func:`~timm_local.data.input_size.sample_file_sizes`, which also checks those files): the
    most common one, with a warning when they differ. None where the source is not image files."""
    sizes: Optional[Counter] = None
    for source in (splits.train, splits.test):
        found = sample_file_sizes(source, seed)
        if found is not None:
            sizes = found if sizes is None else sizes + found
    if not sizes:
        return None
    common = max(sizes.most_common(1)[0][0])
    if len(sizes) > 1 and warn:
        counts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common())
        chosen = f"--img-size {image_size}" if image_size else f"{common} px, the most common (--img-size sets another)"
        logger.warning("%s: images of %d different sizes in the %d files checked (%s); all are resized to %s",
                       splits.origin, len(sizes), sum(sizes.values()), counts, chosen)
    return common


def _model_recipe(dataset: str, image_size: Optional[int], native_chans: int, num_classes: Optional[int],
                  model: ModelInput) -> tuple[DatasetRecipe, str]:
    """A dataset without recipe at ``model``'s input size (or ``--img-size``) with its preprocessing."""
    recipe = generic_recipe(dataset, image_size or model.image_size, native_chans, num_classes)
    if native_chans == 3:
        recipe = replace(recipe, mean=model.mean, std=model.std)
    why = "--img-size" if image_size else f"{model.model}'s pretrained_cfg (timm's resolve_model_data_config)"
    if recipe.train_style != "imagenet":  # small inputs keep the CIFAR-style pad-and-crop
        return recipe, why
    recipe = replace(recipe, crop_pct=model.crop_pct, interpolation=model.interpolation)
    return recipe, f"{why}; crop_pct {model.crop_pct}, {model.interpolation} from the model"


def _generic_recipe(splits: ImageSplits, dataset: str, image_size: Optional[int], num_classes: int,
                    model: Optional[ModelInput], seed: int) -> tuple[DatasetRecipe, str]:
    """The recipe of a dataset without one, and which source decided its input size (for the start line).

    The files are sampled (checked) even when the model decides: a wrong folder fails before the run starts.
    """
    native = _native_image_size(splits, image_size, seed, warn=model is None)
    first, _ = splits.train[0]
    native_chans = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    if model is not None:
        return _model_recipe(dataset, image_size, native_chans, num_classes, model)
    size = image_size or native or max(first.size)
    if image_size:
        why = "--img-size"
    elif native:
        why = "the image files (the most common size in a sample; the model has no input-size default)"
    else:
        why = "the first image (the model has no input-size default)"
    return generic_recipe(dataset, size, native_chans, num_classes), why


def _map_style_recipe(splits: ImageSplits, dataset: str, image_size: Optional[int], found_classes: int,
                      model: Callable[[], Optional[ModelInput]], seed: int) -> tuple[DatasetRecipe, str]:
    """The recipe of map-style ``splits`` and what decided its input size (for the start line).

    A named dataset's own recipe wins over the model's data config, so ``model`` is a callable: the model
    is only created when the dataset has no recipe.
    """
    if splits.recipe is not None:
        return splits.recipe, "--img-size" if image_size else f"the {splits.recipe.name} recipe"
    return _generic_recipe(splits, dataset, image_size, found_classes, model(), seed)


def _preprocessing(recipe: DatasetRecipe, image_size: Optional[int], in_chans: int, augment: bool,
                   mean: Optional[Sequence[float]], std: Optional[Sequence[float]], normalize: bool,
                   extra: Optional[Mapping[str, Any]] = None
                   ) -> tuple[int, tuple[float, ...], tuple[float, ...], tuple[Callable, Callable]]:
    """Input size, mean, std and the (train, test) transforms of ``recipe`` under the run's overrides.

    One place for map-style and streamed sets, so both preprocess a dataset alike; ``extra`` (timm's
    transform knobs) reaches the training transform only, evaluation stays the recipe's.
    """
    size = int(image_size or recipe.image_size)
    mean_ = expand_stats(mean if mean is not None else recipe.mean, in_chans)
    std_ = expand_stats(std if std is not None else recipe.std, in_chans)
    train, test = (build_transform(recipe, size, in_chans, training, augment, mean_, std_, normalize,
                                   extra if training else None) for training in (True, False))
    return size, mean_, std_, (train, test)


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
    model: Optional[str] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    normalize: bool = True,
    streaming: bool = False,
    batch_size: int = 1,
    workers: int = 0,
    augmentation: Optional[Mapping[str, Any]] = None,
) -> tuple[Any, Any, DataConfig]:
    """Build the transformed train and test datasets of a run and describe them: map-style
    :class:`~.seeded.SeededTransformDataset` pairs, or :class:`~.streams.Stream` pairs.

    ``image_size`` defaults to the dataset's own (32 for CIFAR, 96 for STL-10, ...); for a dataset without a
    recipe, to ``model``'s (timm's data config, :mod:`.input_size`), else to its files'. ``in_chans`` is
    what the model wants. ``num_classes`` may exceed the labels found (never fall short of them).
    ``normalize=False``: the sets give uint8 tensors, normalised later on the device
    (:class:`~timm_local.data.device_loader.DeviceBatches` with the returned config's mean/std).
    ``streaming`` (or a ``hfids/`` / ``wds/`` spec) gives iterable sets (:mod:`.streams`), read in shards by
    ``workers`` loader workers per process in batches of ``batch_size`` (global).
    ``augmentation``: timm's transform knobs (:func:`~timm_local.data.transforms.build_transform`'s ``extra``),
    where ``crop_pct`` / ``interpolation`` override the dataset's own (map-style sets).
    """
    if streaming or spec_prefix(dataset) in STREAM_PREFIXES:
        return _stream_datasets(str(dataset), data_dir, image_size=image_size, in_chans=in_chans,
                                num_classes=num_classes, augment=augment, seed=seed, mean=mean, std=std,
                                columns=(image_column, label_column), model=model_input(model, model_kwargs),
                                normalize=normalize, batch_size=batch_size, workers=workers)
    splits = load_image_sources(dataset, data_dir, image_column, label_column)
    found_classes = count_classes(splits)
    if num_classes is not None and num_classes < found_classes:
        raise ValueError(f"num_classes={num_classes} but the dataset has {found_classes} classes ({splits.origin}).")
    extra = dict(augmentation or {})
    overrides = {k: extra.pop(k) for k in ("crop_pct", "interpolation") if extra.get(k) is not None}
    recipe, size_source = _map_style_recipe(splits, str(dataset), image_size, found_classes,
                                            lambda: model_input(model, model_kwargs), seed)
    recipe = replace(recipe, **overrides) if overrides else recipe
    size, mean_, std_, transforms = _preprocessing(recipe, image_size, in_chans, augment, mean, std, normalize, extra)
    train = SeededTransformDataset(splits.train, transforms[0], seed=seed)
    test = SeededTransformDataset(splits.test, transforms[1], seed=seed)
    cfg = DataConfig(
        dataset=recipe.name if recipe.name in RECIPES else str(dataset), origin=splits.origin,
        num_classes=int(num_classes or found_classes), classes=splits.classes, image_size=size, in_chans=in_chans,
        native_in_chans=recipe.in_chans, mean=mean_, std=std_, crop_pct=recipe.crop_pct,
        interpolation=recipe.interpolation, train_size=len(train), test_size=len(test), augment=augment,
        recipe=recipe.name if recipe.name in RECIPES else "generic", size_source=size_source,
    )
    return train, test, cfg


def _stream_datasets(dataset: str, data_dir: Optional[str], *, image_size: Optional[int], in_chans: int,
                     num_classes: Optional[int], augment: bool, seed: int, mean: Optional[Sequence[float]],
                     std: Optional[Sequence[float]], columns: tuple[Optional[str], Optional[str]],
                     model: Optional[ModelInput], normalize: bool, batch_size: int, workers: int
                     ) -> tuple[Any, Any, DataConfig]:
    """Iterable train/test sets (:func:`~.streams.open_streams`): no file is listed or sampled, so the model
    (or ``--img-size``) decides the input size, and the images are taken as RGB."""
    if model is None and not image_size:
        raise ValueError(f"{dataset}: a stream is not sampled at start and the model has no input-size default; "
                         f"pass --img-size")
    if model is not None:
        recipe, size_source = _model_recipe(dataset, image_size, 3, num_classes, model)
    else:
        recipe, size_source = generic_recipe(dataset, int(image_size), 3, num_classes), "--img-size"
    size, mean_, std_, transforms = _preprocessing(recipe, image_size, in_chans, augment, mean, std, normalize)
    train, test, found_classes, classes, origin = open_streams(dataset, data_dir, transforms, batch_size, seed,
                                                               workers, *columns, num_classes)
    if num_classes is not None and num_classes < found_classes:
        raise ValueError(f"num_classes={num_classes} but the dataset has {found_classes} classes ({origin}).")
    cfg = DataConfig(
        dataset=dataset, origin=origin, num_classes=int(num_classes or found_classes), classes=classes,
        image_size=size, in_chans=in_chans, native_in_chans=3, mean=mean_, std=std_, crop_pct=recipe.crop_pct,
        interpolation=recipe.interpolation, train_size=train.num_samples, test_size=test.num_samples,
        augment=augment, recipe="generic", size_source=size_source)
    return train, test, cfg
