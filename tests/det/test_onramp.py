"""The detection on-ramp: what a new user gets wrong first is one line on stderr and exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import ROOT, subprocess_env

DET_TRAIN = ROOT / "tools" / "det_train.py"


def _run(args: list[str], cwd: Path, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, str(DET_TRAIN), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=subprocess_env(**env))


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr lines of ours (libraries may print their own warnings on import)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_missing_detectron2_says_make_install_det(tmp_path: Path) -> None:
    # detectron2 made unimportable, exactly as on a machine without it
    code = ("import runpy, sys; sys.modules['detectron2'] = None; sys.argv = [sys.argv[0], '--help']; "
            f"runpy.run_path({str(DET_TRAIN)!r}, run_name='__main__')")
    proc = _run([], tmp_path, code=code)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "detectron2" in line and "make install-det" in line


def test_missing_coco_names_the_env_variable_and_the_flags(tmp_path: Path) -> None:
    pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")
    proc = _run(["--config-file", str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x_auglocal.yaml")], tmp_path,
                DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "coco_2017_train" in line and "DETECTRON2_DATASETS" in line and str(tmp_path / "nowhere") in line
    assert "--train-json" in line and "--train-images" in line
    assert not (tmp_path / "runs").exists(), "nothing may be written before the data is found"


def test_missing_backbone_weights_is_one_line(tiny_coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = tiny_coco
    proc = _run(["--config-file", str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x_auglocal.yaml"),
                 "--train-json", str(ann), "--train-images", str(images), "--test-json", str(ann),
                 "--test-images", str(images)], tmp_path)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "runs/imagenet-resnet34-auglocal" in line and "does not exist" in line


def test_weights_of_another_architecture_get_settings_that_work(tmp_path: Path) -> None:
    """The mismatch hint for a CIFAR ResNet export names settings that build (no dead end)."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")
    import timm
    import torch
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    import det

    timm.models.save_for_hf(timm.create_model("resnet20_cifar"), tmp_path / "export", safe_serialization=True)
    with pytest.raises(det.WeightsMismatchError) as info:
        det.create_timm_features("resnet34", tmp_path / "export")
    message = str(info.value)
    assert "MODEL.TIMM.NAME to 'resnet20_cifar'" in message
    assert "MODEL.TIMM.OUT_INDICES to [1, 2, 3]" in message
    assert "MODEL.FPN.IN_FEATURES to ['res0', 'res1', 'res2']" in message
    # following the advice builds the detection backbone from those weights
    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.TIMM.NAME", "resnet20_cifar", "MODEL.TIMM.WEIGHTS", str(tmp_path / "export"),
                         "MODEL.TIMM.OUT_INDICES", "[1, 2, 3]", "MODEL.FPN.IN_FEATURES", "['res0', 'res1', 'res2']",
                         "MODEL.TIMM.FREEZE_AT", "0"])
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 32, 32))
    assert [tuple(v.shape[-2:]) for v in out.values()][:3] == [(32, 32), (16, 16), (8, 8)]
