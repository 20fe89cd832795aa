#!/usr/bin/env python
"""Train and COCO-evaluate a detectron2 detector whose backbone is a timm (timm_local) CNN.

detectron2's ``tools/train_net.py`` shape: ``default_argument_parser`` + ``launch`` + a Trainer,
with the timm plug-in (``det``) registered and its config keys added. Examples::

    # COCO 2017 from $DETECTRON2_DATASETS/coco (detectron2's builtin names), 8 GPUs:
    python tools/det_train.py --config-file configs/det/mask_rcnn_R34_FPN_1x_auglocal.yaml --num-gpus 8

    # any COCO-format dataset, no Python needed (classes come from the JSON's categories):
    python tools/det_train.py --config-file configs/det/mask_rcnn_R34_FPN_1x.yaml \\
        --train-json train.json --train-images train/ --test-json val.json --test-images val/ \\
        MODEL.TIMM.WEIGHTS runs/imagenet-resnet34-bp SOLVER.IMS_PER_BATCH 4

    # evaluate a trained detector, or resume an interrupted run:
    python tools/det_train.py --config-file ... --eval-only MODEL.WEIGHTS runs/det/.../model_final.pth
    python tools/det_train.py --config-file ... --resume

The bbox/segm AP table is printed and saved as ``OUTPUT_DIR/ap_table.md`` (+ ``ap_results.json``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:  # ``det`` is installed with the project (pyproject); it needs detectron2, which is not on PyPI
    import det  # registers the timm backbones
except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

from timm_local.errors import UserError
from detectron2.utils.logger import setup_logger

# detectron2 installs its own top-level ``tools`` package, so nothing here may be imported as ``tools.*``.

logger = logging.getLogger("det_train")

_DETECTRON2_DEFAULT_OUTPUT = "./output"


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's standard arguments plus COCO-format datasets given as JSON + image folder."""
    parser = default_argument_parser()
    parser.add_argument("--train-json", help="COCO-format annotations to train on (replaces DATASETS.TRAIN)")
    parser.add_argument("--train-images", help="image folder of --train-json")
    parser.add_argument("--test-json", help="COCO-format annotations to evaluate on (replaces DATASETS.TEST)")
    parser.add_argument("--test-images", help="image folder of --test-json")
    return parser


def build_config(args: argparse.Namespace) -> CfgNode:
    """The frozen config: defaults + timm keys + YAML + datasets + command-line overrides (nothing written)."""
    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    det.use_coco_json_datasets(cfg, args.train_json, args.train_images, args.test_json, args.test_images)
    cfg.merge_from_list(args.opts)
    if cfg.OUTPUT_DIR == _DETECTRON2_DEFAULT_OUTPUT and args.config_file:
        # One folder per recipe, so the BP and AugLocal configs (which differ only in the
        # backbone weights) never overwrite each other.
        cfg.OUTPUT_DIR = str(Path("runs") / "det" / Path(args.config_file).stem)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def preflight(cfg: CfgNode, args: argparse.Namespace) -> None:
    """What a user gets wrong first, refused in one line before any output: data and backbone weights."""
    det.check_datasets_exist(cfg, train=not args.eval_only)
    if cfg.MODEL.TIMM.WEIGHTS and not str(cfg.MODEL.TIMM.WEIGHTS).startswith("hf-hub:"):
        det.resolve_weights(cfg.MODEL.TIMM.WEIGHTS)


def setup(args: argparse.Namespace) -> CfgNode:
    """The config (checked once, by :func:`invoke_main`, before any worker starts), with detectron2's
    logging, seed and OUTPUT_DIR/config.yaml."""
    cfg = build_config(args)  # in every worker: it also registers the COCO-json datasets there
    default_setup(cfg, args)  # logging, seed, and the resolved config saved as OUTPUT_DIR/config.yaml
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="det")  # e.g. which weights were loaded
    if cfg.MODEL.DEVICE == "cpu":
        logger.warning("CUDA is not available: running on CPU (MODEL.DEVICE cpu).")
    det.check_pixel_stats(cfg)
    return cfg


def main(args: argparse.Namespace):
    cfg = setup(args)
    if args.eval_only:
        model = det.Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = det.Trainer.test(cfg, model)
    else:
        trainer = det.Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process() and results:
        det.write_ap_table(results, cfg.OUTPUT_DIR, cfg.DATASETS.TEST)
    return results


#: User errors that get one line on stderr and exit code 2 (``DET_TRAIN_DEBUG=1`` shows the traceback).
USER_ERRORS = (UserError, FileNotFoundError, ValueError)


def invoke_main() -> int:
    args = argument_parser().parse_args()
    try:
        preflight(build_config(args), args)  # fail fast, in this process, before workers start
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except USER_ERRORS as e:
        if os.environ.get("DET_TRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(invoke_main())
