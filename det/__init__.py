"""detectron2 plug-in: any timm ``features_only`` CNN (e.g. a timm_local export) as a backbone.

Importing ``det`` registers ``build_timm_backbone`` and ``build_timm_fpn_backbone`` in
detectron2's ``BACKBONE_REGISTRY``; call :func:`add_timm_config` on a detectron2 config before
merging a YAML that uses ``MODEL.TIMM`` keys::

    from detectron2.config import get_cfg
    import det

    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file("configs/det/mask_rcnn_R34_FPN_1x.yaml")

detectron2 is an optional dependency (``det/install_detectron2.sh``); nothing in
``timm_local`` imports this package.
"""

try:
    import detectron2  # noqa: F401
except ImportError as e:  # the plug-in's one dependency that is not on PyPI: say how to get it
    raise ImportError("the detectron2 plug-in (det) needs detectron2, which is not installed: run `make install-det` "
                      "(or `bash det/install_detectron2.sh PYTHON`); see docs/detection.md") from e

import timm_local.models  # noqa: F401  (registers the *_cifar architectures, so MODEL.TIMM.NAME can name them)

from .backbone import (
    NORMS,
    TimmBackbone,
    build_timm_backbone,
    build_timm_fpn_backbone,
    convert_norm,
    freeze_through,
)
from .config import add_timm_config, get_timm_cfg
from .engine import (
    DetectionDataMissingError,
    Trainer,
    check_datasets_exist,
    check_pixel_stats,
    coco_json_categories,
    format_ap_table,
    register_coco_json,
    use_coco_json_datasets,
    write_ap_table,
)
from .solver import build_optimizer
from .weights import (
    TimmWeights,
    WeightsMismatchError,
    check_checkpoint_matches,
    create_timm_features,
    resolve_weights,
)

__all__ = [
    "DetectionDataMissingError",
    "NORMS",
    "TimmBackbone",
    "TimmWeights",
    "Trainer",
    "WeightsMismatchError",
    "add_timm_config",
    "build_optimizer",
    "build_timm_backbone",
    "build_timm_fpn_backbone",
    "check_checkpoint_matches",
    "check_datasets_exist",
    "check_pixel_stats",
    "coco_json_categories",
    "convert_norm",
    "create_timm_features",
    "format_ap_table",
    "freeze_through",
    "get_timm_cfg",
    "register_coco_json",
    "resolve_weights",
    "use_coco_json_datasets",
    "write_ap_table",
]
