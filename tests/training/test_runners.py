"""Both engines run the one training loop through tools/train.py: the same evaluation, export, resume and NaN stop.

Parametrised over ``--engine``: ``sequential`` in this process, ``pipeline`` as W=2 segments in two
processes under torchrun. The reference is an uninterrupted sequential run of the same config. Tiny on
purpose (2 CPU cores): resnet20_cifar at 8x8 pixels, 16 training images, batch 8, 2 epochs (4 steps).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

import pytest
import timm
import torch
import yaml

import timm_local  # noqa: F401  (our architectures in timm's registry)
from timm_local.export import read_export_metadata
from timm_local.training import list_checkpoints, read_metrics
from timm_local.training.checkpoint import load_model_state

from tests.helpers import PIPELINE, TINY_RESNET, exported, torchrun, train_tool

TINY = [*TINY_RESNET, "--epochs", "2"]
ENGINE_FLAGS = {"sequential": [], "pipeline": PIPELINE}


def launch(engine: str, args: Sequence[object], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run tools/train.py under ``engine``: (exit code, stderr)."""
    args = [*TINY, *ENGINE_FLAGS[engine], *map(str, args)]
    if engine == "sequential":
        capsys.readouterr()
        rc = train_tool.main(args)
        return rc, capsys.readouterr().err
    proc = torchrun(2, args)
    return proc.returncode, proc.stderr


def data_flags(cifar: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(cifar)]


@pytest.fixture(scope="module")
def reference(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_tool.main([*TINY, *data_flags(cifar), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=sorted(ENGINE_FLAGS))
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def stopped(engine: str, cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of ``engine`` stopped by --max-steps 3, inside epoch 2 (a checkpoint at step 3)."""
    out = tmp_path_factory.mktemp(f"stopped_{engine}") / "run"
    args = [*TINY, *ENGINE_FLAGS[engine], *data_flags(cifar), "--output-dir", str(out), "--max-steps", "3"]
    if engine == "sequential":
        assert train_tool.main(args) == 0
    else:
        proc = torchrun(2, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_evaluation_and_export_equal_the_reference(engine, cifar, reference, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = launch(engine, [*data_flags(cifar), "--output-dir", out], capsys)
    assert rc == 0, err[-3000:]
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["num_processes"] == (2 if engine == "pipeline" else 1)
    if engine == "pipeline":
        assert runtime["pipeline"]["segments"] == 2
    rows, ref_rows = read_metrics(out), read_metrics(reference)
    train_rows, ref_train = ([r for r in d if r["kind"] == "train"] for d in (rows, ref_rows))
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r, s in zip(train_rows, ref_train):
        assert len(r["local_losses"]) == len(s["local_losses"])
        assert r["local_losses"] == pytest.approx(s["local_losses"], rel=1e-3, abs=1e-4)
        assert r["train_top1"] == pytest.approx(s["train_top1"])
    evals, ref_evals = ([r for r in d if r["kind"] == "eval"] for d in (rows, ref_rows))
    assert [r["step"] for r in evals] == [2, 4]
    assert [(r["top1"], r["head_top1"]) for r in evals] == [(r["top1"], r["head_top1"]) for r in ref_evals]
    assert_same_weights(exported(out), exported(reference))
    assert read_export_metadata(out / "export")["method"] == "auglocal"
    model = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), timm.create_model(f"local-dir:{reference / 'export'}", pretrained=True).eval()(x))


def test_stop_and_resume_reach_the_reference(engine, cifar, stopped, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    rc, err = launch(engine, [*data_flags(cifar), "--output-dir", out, "--resume", "auto"], capsys)
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert_same_weights(exported(out), exported(reference))


def test_non_finite_loss_stops_before_the_step(engine, cifar, stopped, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = [p.name for p in list_checkpoints(out)]
    weights = load_model_state(list_checkpoints(out)[-1])
    # a normalisation std of 1e-39 turns the inputs into inf: the first local loss is NaN
    rc, err = launch(engine, [*data_flags(cifar), "--output-dir", out, "--resume", "auto", "--std", "[1e-39]"],
                     capsys)
    assert rc != 0 and (engine != "sequential" or rc == 3)
    assert re.search(r"Non-finite loss \(.*\) at epoch 1, step 3\.", err), err[-3000:]
    # the inputs are the culprit, so the weights of the newest checkpoint are innocent: that is the one named
    assert "step_00000003 is finite and its weights gave a finite step" in err
    assert "the input batch itself is not finite" in err and "--resume auto" in err
    assert [p.name for p in list_checkpoints(out)] == before
    assert_same_weights(load_model_state(list_checkpoints(out)[-1]), weights)
    last = read_metrics(out)[-1]
    assert last["kind"] == "error" and last["step"] == 3 and "Non-finite loss" in last["error"]


def test_the_pipeline_engine_refuses_a_single_process(cifar, tmp_path):
    with pytest.raises(ValueError, match="single process"):
        train_tool.main([*TINY, *data_flags(cifar), "--engine", "pipeline", "--pipeline-segments", "2",
                         "--output-dir", str(tmp_path / "run")])
