"""load_local_model restores a run's heads exactly; benchmarks/head_accuracy.py reports them per layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, load_module, train_tool, write_mnist_idx
from timm_local.methods.auglocal import auglocal_plans
from timm_local.training import latest_checkpoint, load_local_model, read_metrics
from timm_local.training.checkpoint import load_model_state

heads_tool = load_module("_head_accuracy", ROOT / "benchmarks" / "head_accuracy.py")


@pytest.fixture(scope="module")
def auglocal_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    write_mnist_idx(root / "data", n_train=16, n_test=12)
    out = root / "run"
    assert train_tool.main(["--dataset", "fashion_mnist", "--data-dir", str(root / "data"), "--model", "resnet20_cifar",
                            "--method", "auglocal", "--aux-depth", "3", "--epochs", "1", "--image-size", "8",
                            "--batch-size", "8", "--workers", "0", "--trackers", "none", "--seed", "0",
                            "--output-dir", str(out)]) == 0
    return out


def test_load_local_model_restores_backbone_and_heads(auglocal_run):
    lm, run = load_local_model(auglocal_run)
    saved = load_model_state(latest_checkpoint(auglocal_run))
    state = lm.state_dict()
    assert set(state) == set(saved) and any(k.startswith("heads.") for k in state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert (run.meta["method"], run.cfg.model, run.data.num_classes) == ("auglocal", "resnet20_cifar", 10)


def test_head_accuracy_matches_the_runs_own_evaluation(auglocal_run, tmp_path):
    heads_tool.main([str(auglocal_run), "--test-samples", "0", "--batch-size", "5", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "head_accuracy_fashion_mnist.json").read_text())
    (r,) = saved["runs"]
    last_eval = [row for row in read_metrics(auglocal_run) if row["kind"] == "eval"][-1]
    # the reloaded model scores exactly what the training loop measured, backbone and every head
    assert r["samples"] == 12 and r["backbone_top1"] == last_eval["top1"]
    assert r["head_top1"] == last_eval["head_top1"]
    # heads sit on blocks 0..K-2 of the AugLocal plan (resnet20: N = 10 blocks, d=3 -> K = 8)
    lm, _ = load_local_model(auglocal_run)
    assert r["head_blocks"] == [p.block for p in auglocal_plans(lm.partition.specs, 3, 0.5)] == list(range(7))
    table = (tmp_path / "head_accuracy_fashion_mnist.md").read_text()
    assert "| auglocal d=3 | 1 |" in table and (tmp_path / "head_accuracy_fashion_mnist.png").is_file()


def test_load_local_model_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_local_model(tmp_path)
