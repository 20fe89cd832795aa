"""Bad input is found before anything is written and reported in one line.

Every user error of tools/train.py is one line on stderr and exit code 2, with no output folder left behind;
fp16 without a GPU is refused (it would silently train fp32); the overwrite guard covers every output of a
run; an image that cannot be decoded names its file; mixed image sizes warn with the counts and the size
chosen.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import timm_local.data as tld
from tests.helpers import ROOT, error_lines, resume, train, train_tool
from timm_local.training import CHECKPOINT_DIR
from timm_local.training.builders import has_accelerator

BAD_FLAGS = {
    "epochs_zero": (["--epochs", "0"], "--epochs must be a positive integer"),
    "batch_size_zero": (["--batch-size", "0"], "--batch-size must be a positive integer"),
    "negative_lr": (["--lr", "-1"], "--lr must be a positive number"),
    "negative_workers": (["--workers", "-1"], "--workers must be 0"),
    "unknown_engine": (["--engine", "bogus"], "--engine must be sequential or pipeline"),
    "unknown_precision": (["--mixed-precision", "fp8"], "--mixed-precision must be no | fp16 | bf16"),
    "not_an_int": (["--epochs", "many"], "'epochs': cannot use 'many' as int"),
    "unknown_flag": (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    "unknown_model": (["--model", "nope"], "unknown model 'nope'"),
    "unknown_method": (["--method", "nope"], "unknown method 'nope'"),
    "aux_depth_one": (["--aux-depth", "1"], "--aux-depth must be an integer >= 2"),
    "aux_depth_too_deep": (["--aux-depth", "40"], "aux_depth=40 leaves no block"),
    "tau_above_one": (["--tau", "2"], "--tau must be in [0, 1]"),
    "method_kwarg": (["--method-kwargs", "{nope: 1}"], "takes no ['nope']"),
    "too_many_classes_missing": (["--num-classes", "3"], "num_classes=3 but the dataset has 10 classes"),
    "batch_over_dataset": (["--batch-size", "5000"], "fewer than one batch"),
    "zero_std": (["--std", "[0]"], "--std must be positive"),
    "missing_config": (["--config", "nope.yaml"], "config file not found: nope.yaml"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_each_bad_flag_is_one_line_exit_code_2_and_writes_nothing(case, tmp_path, capsys):
    flags, message = BAD_FLAGS[case]
    out = tmp_path / "run"
    rc = train(*flags, "--output-dir", out)
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists(), "an early failure must not leave an output folder"


def test_the_command_line_gives_one_line_and_debug_gives_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TIMM_LOCAL_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--lr", "-1", "--output-dir", str(tmp_path / "run")]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and plain.stderr.strip() == "error: --lr must be a positive number, got -1.0"
    debug = subprocess.run([*cmd, "--debug"], env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError: --lr must be" in debug.stderr


@pytest.mark.skipif(has_accelerator(), reason="fp16 is valid where a GPU is present")
def test_fp16_without_a_gpu_is_refused_naming_bf16(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--mixed-precision", "fp16", "--max-steps", 1, "--output-dir", out) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--mixed-precision bf16" in lines[0] and not out.exists()


def test_bf16_on_the_cpu_is_recorded_as_used(tmp_path):
    import yaml

    out = tmp_path / "run"
    assert train("--mixed-precision", "bf16", "--max-steps", 1, "--output-dir", out) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mixed_precision"] == saved["runtime"]["mixed_precision"] == "bf16"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train("--max-steps", 2, "--output-dir", out) == 0
    return out


@pytest.mark.parametrize("resume_auto", [False, True], ids=["new_run", "resume_auto"])
def test_the_overwrite_guard_covers_a_run_without_checkpoints(resume_auto, finished, tmp_path, capsys):
    """Checkpoints deleted to save space: the export, metrics and config of the finished run stay untouched."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / CHECKPOINT_DIR)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = resume(out, "--max-steps", 2) if resume_auto else train("--max-steps", 2, "--output-dir", out)
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "export" in lines[0] and "metrics.jsonl" in lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _image_folder(root: Path, sizes: list[int]) -> Path:
    """train/ and test/ with one class per folder; image i of each class has size ``sizes[i]``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, size in enumerate(sizes):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def test_an_image_that_cannot_be_decoded_is_named_before_anything_is_written(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", [16] * 8)
    bad = data / "train" / "b" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # cut short, as an interrupted copy leaves it
    out = tmp_path / "run"
    rc = train_tool.main(["--dataset", str(data), "--batch-size", "4", "--workers", "0", "--trackers", "none",
                          "--max-steps", "1", "--output-dir", str(out)])
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0] and not out.exists()


def test_a_decoding_error_in_training_names_the_file(tmp_path):
    data = _image_folder(tmp_path / "data", [16] * 4)
    train_set, _, _ = tld.create_datasets(str(data))
    path = Path(train_set.source.dataset.samples[2][0])
    path.write_bytes(path.read_bytes()[:60])  # damaged after the start-up check
    with pytest.raises(tld.CorruptImageError, match=str(path)):
        train_set[2]


def test_mixed_image_sizes_warn_with_the_counts_and_use_the_most_common(tmp_path, caplog):
    """The first file (sorted) is the small one: it used to set the size of the whole run."""
    data = _image_folder(tmp_path / "data", [20, 32, 32, 32])
    with caplog.at_level(logging.WARNING):
        train_set, _, cfg = tld.create_datasets(str(data))
    assert cfg.image_size == 32 and tuple(train_set[0][0].shape) == (3, 32, 32)
    warned = [r.getMessage() for r in caplog.records if "different sizes" in r.getMessage()]
    assert len(warned) == 1 and "32x32: 12" in warned[0] and "20x20: 4" in warned[0] and "32 px" in warned[0]
