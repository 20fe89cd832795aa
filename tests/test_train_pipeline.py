"""tools/train.py --engine pipeline: W=2 pipeline segments in 2 CPU processes == the sequential engine in one.

Tiny on purpose (2 CPU cores shared): resnet20_cifar at 8x8 pixels, 16 training images, batch 8, 2 epochs.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from timm_local.training import read_metrics


from tests.helpers import load_module as _load, torchrun, train_tool


TINY = ["--image-size", "8", "--batch-size", "8", "--workers", "0", "--trackers", "none", "--lr", "0.05",
        "--log-every", "1", "--seed", "0", "--model", "resnet20_cifar", "--method", "auglocal"]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return torchrun(nproc, [*TINY, *args])


def _common(cifar: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(cifar), "--epochs", "2"]


PIPELINE = ["--engine", "pipeline", "--pipeline-segments", "2", "--pipeline-cost", "macs"]


@pytest.fixture(scope="module")
def sequential_run(cifar, tmp_path_factory) -> Path:
    """The reference: the sequential engine in one process (this one), same config."""
    seq = tmp_path_factory.mktemp("seq") / "run"
    assert train_tool.main([*TINY, *_common(cifar), "--output-dir", str(seq)]) == 0
    return seq


def _same_export(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "export" / "model.safetensors"))
    b = load_file(str(b_dir / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k


def test_pipeline_two_segments_equals_sequential(cifar, sequential_run, tmp_path):
    pipe, seq = tmp_path / "pipe", sequential_run
    proc = _torchrun(2, *_common(cifar), *PIPELINE, "--output-dir", pipe)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runtime = yaml.safe_load((pipe / "config.yaml").read_text())["runtime"]
    assert runtime["num_processes"] == 2 and runtime["pipeline"]["segments"] == 2
    _same_export(seq, pipe)

    rows, ref = read_metrics(pipe), read_metrics(seq)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]
    ref_train = [r for r in ref if r["kind"] == "train"]
    for r, s in zip(train_rows, ref_train):
        assert len(r["local_losses"]) == len(s["local_losses"])
        assert r["local_losses"] == pytest.approx(s["local_losses"], rel=1e-3, abs=1e-4)
        assert r["train_top1"] == pytest.approx(s["train_top1"])
    assert [r["top1"] for r in rows if r["kind"] == "eval"] == [r["top1"] for r in ref if r["kind"] == "eval"]


def test_pipeline_refuses_a_single_process(cifar, tmp_path):
    with pytest.raises(ValueError, match="single process"):
        train_tool.main([*TINY, "--dataset", "cifar10", "--data-dir", str(cifar), "--engine", "pipeline",
                         "--pipeline-segments", "2", "--output-dir", str(tmp_path / "run")])


def test_pipeline_stop_mid_epoch_then_resume(cifar, sequential_run, tmp_path):
    """Stopped after 3 of 4 steps (inside epoch 2), resumed with --resume auto: the straight run's weights."""
    out = tmp_path / "run"
    proc = _torchrun(2, *_common(cifar), *PIPELINE, "--output-dir", out, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(2, *_common(cifar), *PIPELINE, "--output-dir", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    _same_export(sequential_run, out)
