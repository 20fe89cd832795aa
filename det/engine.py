"""Training/evaluation glue: the Trainer, COCO-format datasets from a JSON, the AP table.

Kept in the package (not in ``tools/det_train.py``) so everything the entry point does can be
done from Python: ``from det import Trainer, register_coco_json, write_ap_table``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch import nn

from timm_local.errors import UserError

from .solver import build_optimizer
from .weights import resolve_weights

__all__ = [
    "DetectionDataMissingError",
    "Trainer",
    "check_datasets_exist",
    "coco_json_categories",
    "register_coco_json",
    "use_coco_json_datasets",
    "check_pixel_stats",
    "format_ap_table",
    "write_ap_table",
]

logger = logging.getLogger(__name__)

AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DetectionDataMissingError(UserError, FileNotFoundError):
    """A dataset the config names has no annotation file or image folder on disk (said before training)."""


def check_datasets_exist(cfg: CfgNode, train: bool = True) -> None:
    """Refuse, before anything is built, a config whose datasets are not on disk.

    detectron2 registers its builtin datasets (``coco_2017_train`` ...) under ``$DETECTRON2_DATASETS``
    and fails only when the loader opens the JSON, with a bare ``FileNotFoundError``; this says where it
    looked and both ways to fix it.
    """
    names = (list(cfg.DATASETS.TRAIN) if train else []) + list(cfg.DATASETS.TEST)
    for name in names:
        if name not in DatasetCatalog.list():
            raise DetectionDataMissingError(
                f"dataset {name!r} (cfg.DATASETS) is not registered; use detectron2's builtin names (coco_2017_train, "
                f"...) or --train-json FILE --train-images DIR (and --test-json / --test-images)")
        meta = MetadataCatalog.get(name)
        for what, path, exists in (("annotation file", getattr(meta, "json_file", None), os.path.isfile),
                                   ("image folder", getattr(meta, "image_root", None), os.path.isdir)):
            if path and not exists(path):
                root = os.environ.get("DETECTRON2_DATASETS")
                raise DetectionDataMissingError(
                    f"dataset {name!r}: {what} {path} not found. detectron2 reads its builtin datasets from "
                    f"$DETECTRON2_DATASETS ({'now ' + repr(root) if root else 'unset: ./datasets'}); point it at the "
                    f"folder that holds coco/, or train on any COCO-format data with --train-json FILE "
                    f"--train-images DIR (and --test-json / --test-images)")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with COCO evaluation, AdamW and a configurable log period."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        """COCO box (and mask, when ``MODEL.MASK_ON``) AP for any COCO-format dataset."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module):
        """``SOLVER.OPTIMIZER``: SGD (detectron2's builder) or ADAMW (see :mod:`det.solver`)."""
        return build_optimizer(cfg, model)

    def train(self):
        """Train, and return the final evaluation results (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set, but the entry point always prints the AP table)."""
        results = super().train()
        if results is None and comm.is_main_process():
            results = getattr(self, "_last_eval_results", None)
        return results

    def build_hooks(self) -> list[hooks.HookBase]:
        """detectron2's hooks, with the metrics writer period taken from ``SOLVER.LOG_PERIOD``."""
        ret = super().build_hooks()
        period = int(self.cfg.SOLVER.get("LOG_PERIOD", 20))
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = period  # detectron2 hard-codes 20 in DefaultTrainer.build_hooks
        return ret


def coco_json_categories(json_file: str | Path) -> list[str]:
    """Class names of a COCO-format annotation file, in category-id order.

    This is the order detectron2's ``load_coco_json`` uses for its contiguous class ids, so
    ``len(...)`` is ``MODEL.ROI_HEADS.NUM_CLASSES``.
    """
    with open(json_file, encoding="utf-8") as f:
        categories = json.load(f).get("categories") or []
    if not categories:
        raise ValueError(f"{json_file} has no 'categories'; a COCO-format file lists its classes there.")
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def register_coco_json(name: str, json_file: str | Path, image_root: str | Path) -> list[str]:
    """Register a COCO-format dataset under ``name`` (replacing an earlier one); returns classes."""
    json_file, image_root = str(json_file), str(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Annotation file {json_file} does not exist.")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image folder {image_root} does not exist.")
    classes = coco_json_categories(json_file)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": classes}, json_file, image_root)
    return classes


def use_coco_json_datasets(
    cfg: CfgNode,
    train_json: str | None = None,
    train_images: str | None = None,
    test_json: str | None = None,
    test_images: str | None = None,
) -> CfgNode:
    """Point ``cfg.DATASETS`` at COCO-format JSON datasets and set the class count from them.

    Registers ``timm_det_train`` / ``timm_det_test``. Must run in every process (detectron2's
    ``launch`` spawns workers that do not inherit the registry), i.e. inside ``main``.
    """
    classes: dict[str, list[str]] = {}
    for split, json_file, images in (("train", train_json, train_images), ("test", test_json, test_images)):
        if bool(json_file) != bool(images):
            raise ValueError(f"--{split}-json and --{split}-images must be given together.")
        if json_file:
            name = f"timm_det_{split}"
            classes[split] = register_coco_json(name, json_file, images)
            if split == "train":
                cfg.DATASETS.TRAIN = (name,)
            else:
                cfg.DATASETS.TEST = (name,)
    if "train" in classes and "test" in classes and classes["train"] != classes["test"]:
        raise ValueError(
            f"Train and test JSONs list different categories: {classes['train']} vs {classes['test']}."
        )
    if classes:
        names = next(iter(classes.values()))
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(names)
        cfg.MODEL.RETINANET.NUM_CLASSES = len(names)
    return cfg


def check_pixel_stats(cfg: CfgNode) -> None:
    """Warn when the detector normalises inputs differently from how the backbone was trained.

    ``MODEL.PIXEL_MEAN/STD`` are in 0-255 units in ``INPUT.FORMAT`` channel order; the export's
    ``pretrained_cfg`` holds timm's 0-1 RGB mean/std.
    """
    spec = cfg.MODEL.TIMM.WEIGHTS
    if not spec or str(spec).startswith("hf-hub:"):
        return
    try:
        pretrained = resolve_weights(spec).pretrained_cfg
    except FileNotFoundError:
        return  # the backbone builder raises the clear error
    mean, std = pretrained.get("mean"), pretrained.get("std")
    if not mean or not std:
        return
    if cfg.INPUT.FORMAT == "BGR":
        mean, std = list(mean)[::-1], list(std)[::-1]
    want_mean, want_std = [255.0 * m for m in mean], [255.0 * s for s in std]
    close = all(abs(a - b) < 0.5 for a, b in zip(cfg.MODEL.PIXEL_MEAN, want_mean)) and all(
        abs(a - b) < 0.5 for a, b in zip(cfg.MODEL.PIXEL_STD, want_std)
    )
    if not close:
        logger.warning(
            "MODEL.PIXEL_MEAN/STD %s/%s (%s) differ from the backbone's training normalisation %s/%s "
            "(from %s). Set them to match unless this is intended.",
            list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD), cfg.INPUT.FORMAT,
            [round(v, 3) for v in want_mean], [round(v, 3) for v in want_std], spec,
        )


def _by_dataset(results: Mapping[str, Any], datasets: Sequence[str] = ()) -> dict[str, Any]:
    """``{dataset: {task: {metric: value}}}``, whatever shape ``Trainer.test`` returned.

    detectron2 drops the dataset level when there is a single test set; ``datasets``
    (``cfg.DATASETS.TEST``) puts the name back.
    """
    if results and all(k in ("bbox", "segm", "keypoints", "sem_seg", "panoptic_seg") for k in results):
        name = datasets[0] if len(datasets) == 1 else ""
        return {name: dict(results)}
    return dict(results)


def format_ap_table(results: Mapping[str, Any], datasets: Sequence[str] = ()) -> str:
    """A Markdown table of COCO AP per dataset and task (bbox, segm), from ``Trainer.test``.

    NaN (the evaluator had nothing to score, e.g. no large objects) is shown as ``n/a``.
    """
    lines = ["| dataset | task | " + " | ".join(AP_METRICS) + " |",
             "|---|---|" + "---|" * len(AP_METRICS)]
    for dataset, tasks in _by_dataset(results, datasets).items():
        for task, metrics in tasks.items():
            cells = []
            for m in AP_METRICS:
                v = metrics.get(m)
                cells.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}")
            lines.append(f"| {dataset} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_ap_table(results: Mapping[str, Any], output_dir: str | Path, datasets: Sequence[str] = ()) -> str:
    """Print the AP table and save it as ``ap_table.md`` and ``ap_results.json`` in output_dir.

    ``ap_results.json`` is ``{dataset: {task: {metric: value}}}`` with NaN written as null, so
    that it is standard JSON.
    """
    table = format_ap_table(results, datasets)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ap_table.md").write_text(table + "\n", encoding="utf-8")
    plain = json.loads(json.dumps(_by_dataset(results, datasets), default=float), parse_constant=lambda _: None)
    (out / "ap_results.json").write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
    print(table, flush=True)
    return table
