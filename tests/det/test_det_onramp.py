"""The detection on-ramp: what a new user gets wrong first is one line on stderr and exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DET_TRAIN = REPO / "tools" / "det_train.py"


def _run(args: list[str], cwd: Path, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, str(DET_TRAIN), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env})


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
    proc = _run(["--config-file", str(REPO / "configs" / "det" / "mask_rcnn_R34_FPN_1x_auglocal.yaml")], tmp_path,
                DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "coco_2017_train" in line and "DETECTRON2_DATASETS" in line and str(tmp_path / "nowhere") in line
    assert "--train-json" in line and "--train-images" in line
    assert not (tmp_path / "runs").exists(), "nothing may be written before the data is found"


def test_missing_backbone_weights_is_one_line(tiny_coco: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = tiny_coco
    proc = _run(["--config-file", str(REPO / "configs" / "det" / "mask_rcnn_R34_FPN_1x_auglocal.yaml"),
                 "--train-json", str(ann), "--train-images", str(images), "--test-json", str(ann),
                 "--test-images", str(images)], tmp_path)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "runs/imagenet-resnet34-auglocal" in line and "does not exist" in line
