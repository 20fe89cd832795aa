"""The timm backbone inside detectron2: exact weight loading, clear mismatch errors, options."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")

import timm  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from detectron2.modeling.backbone import BACKBONE_REGISTRY  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

import det  # noqa: E402

from tests.helpers import ROOT



def _cfg(*opts: object) -> CfgNode:
    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x.yaml"))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def _reference_features(export: Path, x: torch.Tensor) -> list[torch.Tensor]:
    """What timm itself gives for the exported weights, with no detectron2 involved."""
    ref = timm.create_model(f"local-dir:{export}", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        return ref.eval()(x)


def _weights_spec(run: Path, form: str, scratch: Path) -> str:
    """MODEL.TIMM.WEIGHTS in the given form; the bare file has no config.json beside it."""
    export = run / "export"
    if form == "safetensors-file":
        bare = scratch / "r34.safetensors"
        shutil.copyfile(export / "model.safetensors", bare)
        return str(bare)
    return {"run-dir": str(run), "local-dir": f"local-dir:{export}"}[form]


@pytest.mark.parametrize("form", ["run-dir", "safetensors-file", "local-dir"])
def test_backbone_features_equal_timm(resnet34_run: Path, form: str, tmp_path: Path) -> None:
    """Feature maps inside detectron2 (registry-built FPN's bottom-up) equal timm's own, bit for bit.

    NORM BN keeps timm's layers, so the arithmetic is identical and equality must be exact.
    """
    cfg = _cfg("MODEL.TIMM.WEIGHTS", _weights_spec(resnet34_run, form, tmp_path), "MODEL.TIMM.NORM", "BN",
               "MODEL.TIMM.FREEZE_AT", 0)
    fpn = build_backbone(cfg)
    assert type(fpn).__name__ == "FPN"
    backbone = fpn.bottom_up
    assert isinstance(backbone, det.TimmBackbone)

    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = backbone.eval()(x)
    theirs = _reference_features(resnet34_run / "export", x)
    assert list(ours) == ["res2", "res3", "res4", "res5"]
    for (name, a), b in zip(ours.items(), theirs):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name
        assert a.abs().mean() > 1e-3  # not a trivially-equal all-zero map

    # and the FPN on top gives detectron2's P2-P6 at the right strides
    with torch.no_grad():
        pyramid = fpn.eval()(x)
    assert {k: (v.shape[1], 128 // v.shape[3]) for k, v in pyramid.items()} == {
        "p2": (256, 4), "p3": (256, 8), "p4": (256, 16), "p5": (256, 32), "p6": (256, 64)
    }


def test_recipe_backbone_matches_timm_with_frozen_bn(resnet34_run: Path) -> None:
    """The recipe as shipped (FrozenBN, FREEZE_AT 2) computes the same function as timm's eval mode.

    FrozenBN folds the statistics into a scale and shift, so equality is up to float rounding.
    """
    backbone = build_backbone(_cfg("MODEL.TIMM.WEIGHTS", str(resnet34_run))).bottom_up
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = backbone.train()(x)  # training mode: FrozenBN must still use the stored statistics
    for a, b in zip(ours.values(), _reference_features(resnet34_run / "export", x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_output_shape_and_size_divisibility(resnet34_run: Path) -> None:
    backbone = BACKBONE_REGISTRY.get("build_timm_backbone")(_cfg("MODEL.TIMM.WEIGHTS", resnet34_run), ShapeSpec(channels=3))
    shapes = {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()}
    assert shapes == {"res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}
    assert backbone.size_divisibility == 32
    fpn = build_backbone(_cfg("MODEL.TIMM.WEIGHTS", resnet34_run))
    assert fpn.size_divisibility == 32


def test_stride_names_follow_detectron2_and_refuse_strides_that_are_not_powers_of_two() -> None:
    from det.feature_names import stride_feature_name

    assert [stride_feature_name(s) for s in (1, 2, 4, 32)] == ["res0", "res1", "res2", "res5"]
    assert stride_feature_name(12) is None and stride_feature_name(6) is None


def test_name_taken_from_export_config(resnet18_export: Path) -> None:
    """With MODEL.TIMM.NAME empty, the export's config.json decides the architecture."""
    backbone = build_backbone(_cfg("MODEL.TIMM.NAME", "", "MODEL.TIMM.WEIGHTS", resnet18_export)).bottom_up
    assert backbone.body.layer1 is not None and len(backbone.body.layer1) == 2  # resnet18: 2 blocks


def test_mismatched_checkpoint_names_missing_keys(resnet18_export: Path) -> None:
    with pytest.raises(det.WeightsMismatchError) as err:
        build_backbone(_cfg("MODEL.TIMM.WEIGHTS", resnet18_export))
    msg = str(err.value)
    assert "does not fit timm model 'resnet34'" in msg
    assert "96 missing keys" in msg and "layer1.2.conv1.weight" in msg
    assert "unexpected" not in msg
    assert "exported from 'resnet18'" in msg


def test_mismatched_checkpoint_names_unexpected_keys(resnet34_run: Path) -> None:
    with pytest.raises(det.WeightsMismatchError) as err:
        det.create_timm_features("resnet18", resnet34_run / "export" / "model.safetensors")
    msg = str(err.value)
    assert "96 unexpected keys" in msg and "layer1.2.conv1.weight" in msg
    assert "missing" not in msg


def test_other_family_lists_both_sides(resnet34_run: Path) -> None:
    with pytest.raises(det.WeightsMismatchError) as err:
        det.create_timm_features("efficientnet_b0", resnet34_run)
    msg = str(err.value)
    assert "353 missing keys: blocks.0.0.bn1.bias" in msg
    assert "213 unexpected keys: conv1.weight, fc.bias, fc.weight, layer1.0.bn1.bias" in msg
    assert "4 shape mismatches: bn1.bias: checkpoint [64] vs model [32]" in msg


def test_missing_weights_path_is_a_clear_error(tmp_path: Path, resnet34_run: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MODEL.TIMM.WEIGHTS"):
        det.create_timm_features("resnet34", tmp_path / "nope")
    bare = tmp_path / "r34.safetensors"
    shutil.copyfile(resnet34_run / "export" / "model.safetensors", bare)
    with pytest.raises(ValueError, match="no config.json naming the architecture"):
        det.create_timm_features("", bare)


def test_freeze_at_and_frozen_bn(resnet34_run: Path) -> None:
    """FREEZE_AT 2 = stem + res2 frozen (as detectron2's ResNet), BN there becomes frozen."""
    body = build_backbone(_cfg("MODEL.TIMM.WEIGHTS", resnet34_run, "MODEL.TIMM.NORM", "BN")).bottom_up.body
    assert not body.conv1.weight.requires_grad and not body.layer1[2].conv2.weight.requires_grad
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert body.layer2[0].conv1.weight.requires_grad
    assert type(body.layer2[0].bn1) is nn.BatchNorm2d

    none = build_backbone(_cfg("MODEL.TIMM.WEIGHTS", resnet34_run, "MODEL.TIMM.NORM", "BN", "MODEL.TIMM.FREEZE_AT", 0))
    assert all(p.requires_grad for p in none.parameters())


def test_group_norm_keeps_affine_weights(resnet34_run: Path) -> None:
    body = build_backbone(
        _cfg("MODEL.TIMM.WEIGHTS", resnet34_run, "MODEL.TIMM.NORM", "GN", "MODEL.TIMM.FREEZE_AT", 0)
    ).bottom_up.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    gn = body.layer3[0].bn2
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32 and gn.num_channels == 256
    ref = timm.create_model(f"local-dir:{resnet34_run / 'export'}", pretrained=True)
    torch.testing.assert_close(gn.weight.detach(), ref.layer3[0].bn2.weight, rtol=0, atol=0)


def test_adamw_optimizer_groups() -> None:
    """SOLVER.OPTIMIZER ADAMW: AdamW with the recipe's decay, none on norm layers."""
    cfg = _cfg("MODEL.TIMM.NORM", "GN", "MODEL.TIMM.FREEZE_AT", 0)
    model = build_backbone(cfg)
    opt = det.build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, 0.05}
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
    for g in opt.param_groups:
        if any(id(p) in norm_params for p in g["params"]):
            assert g["weight_decay"] == 0.0
        assert g["lr"] == pytest.approx(2e-4) and tuple(g["betas"]) == (0.9, 0.999)
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(det.build_optimizer(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        det.build_optimizer(cfg, model)


def test_bp_and_auglocal_recipes_differ_only_in_weights() -> None:
    bp = _cfg()
    bp.merge_from_file(str(ROOT / "configs/det/mask_rcnn_R34_FPN_1x_bp.yaml"))
    al = _cfg()
    al.merge_from_file(str(ROOT / "configs/det/mask_rcnn_R34_FPN_1x_auglocal.yaml"))

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(bp), flat(al)
    assert {k for k in a if a[k] != b[k]} == {"MODEL.TIMM.WEIGHTS"}
    assert bp.SOLVER.OPTIMIZER == "ADAMW" and bp.SOLVER.IMS_PER_BATCH == 16 and bp.SOLVER.MAX_ITER == 90000
    assert bp.INPUT.FORMAT == "RGB" and bp.MODEL.MASK_ON
    assert [round(v / 255, 3) for v in bp.MODEL.PIXEL_MEAN] == [0.485, 0.456, 0.406]
    assert [round(v / 255, 3) for v in bp.MODEL.PIXEL_STD] == [0.229, 0.224, 0.225]


def test_coco_json_dataset_registration(tiny_coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = tiny_coco
    cfg = det.add_timm_config(get_cfg())
    det.use_coco_json_datasets(cfg, str(ann), str(images), str(ann), str(images))
    assert cfg.DATASETS.TRAIN == ("timm_det_train",) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get("timm_det_train")
    assert len(dicts) == 4 and all(len(d["annotations"]) == 2 for d in dicts)
    assert MetadataCatalog.get("timm_det_test").thing_classes == ["square", "triangle"]

    other = tmp_path / "other.json"
    other.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}')
    with pytest.raises(ValueError, match="different categories"):
        det.use_coco_json_datasets(det.add_timm_config(get_cfg()), str(ann), str(images), str(other), str(images))
    with pytest.raises(ValueError, match="--test-json and --test-images"):
        det.use_coco_json_datasets(det.add_timm_config(get_cfg()), test_json=str(ann))


def test_ap_table_is_written_as_markdown_and_json_naming_a_single_dataset(tmp_path: Path) -> None:
    results = {"val": {"bbox": {"AP": 36.3, "AP50": 58.0, "AP75": 39.1, "APs": 21.0, "APm": 39.5, "APl": math.nan},
                       "segm": {"AP": 33.8, "AP50": 55.0, "AP75": 35.9, "APs": 15.0, "APm": 36.0, "APl": 48.0}}}
    table = det.write_ap_table(results, tmp_path)
    assert "| val | bbox | 36.30 | 58.00 | 39.10 | 21.00 | 39.50 | n/a |" in table
    assert (tmp_path / "ap_table.md").read_text().strip() == table
    saved = json.loads((tmp_path / "ap_results.json").read_text())
    assert saved["val"]["bbox"]["APl"] is None and saved["val"]["segm"]["AP"] == 33.8

    # detectron2 drops the dataset level for a single test set; the name is put back
    flat = det.format_ap_table(results["val"], datasets=("coco_2017_val",))
    assert "| coco_2017_val | segm | 33.80 | 55.00 | 35.90 | 15.00 | 36.00 | 48.00 |" in flat


def test_install_script_leaves_existing_detectron2_alone() -> None:
    """det/install_detectron2.sh is idempotent: an importable detectron2 is used as is."""
    proc = subprocess.run(
        ["bash", str(ROOT / "det" / "install_detectron2.sh"), sys.executable],  # as the Makefile calls it
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already importable" in proc.stdout
