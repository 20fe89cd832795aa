"""EMA of the backbone (timm's ModelEmaV3) and the exported weights: the EMA is evaluated beside the raw
weights, checkpointed as ema.safetensors and resumed bit for bit; --export-weights best exports the best
epoch's weights, last the last ones, ema the EMA.

Tiny on purpose (2 CPU cores): resnet20_cifar at 8x8 pixels, 16 CIFAR-10 images, batch 8 (2 steps per epoch).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_local.export import read_export_metadata
from timm_local.training import list_checkpoints, read_metrics
from timm_local.training.checkpoint import load_model_state

from tests.helpers import exported, train


def cifar_flags(cifar: Path) -> list:
    return ["--dataset", "cifar10", "--data-dir", cifar, "--model", "resnet20_cifar", "--method", "auglocal"]


EMA = ["--model-ema", "--model-ema-decay", "0.5", "--export-weights", "ema", "--epochs", "2"]


def checkpoint_backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in load_model_state(checkpoint).items() if k.startswith("backbone.")}


def different(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def ema_run(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema") / "run"
    assert train(*cifar_flags(cifar), *EMA, "--output-dir", out) == 0
    return out


def test_the_ema_is_evaluated_checkpointed_and_exported(ema_run):
    evals = [r for r in read_metrics(ema_run) if r["kind"] == "eval"]
    assert evals and all({"ema_top1", "ema_top5", "ema_loss", "top5"} <= set(r) for r in evals)
    last = list_checkpoints(ema_run)[-1]
    ema = load_file(str(last / "ema.safetensors"))
    assert different(ema, exported(ema_run)) == []
    raw = checkpoint_backbone(last)
    assert different(ema, raw), "the EMA must differ from the raw weights after a few steps at decay 0.5"
    assert read_export_metadata(ema_run / "export")["exported_weights"].startswith("EMA of the weights")


def test_the_ema_resumes_bit_for_bit(cifar, ema_run, tmp_path):
    out = tmp_path / "run"
    assert train(*cifar_flags(cifar), *EMA, "--output-dir", out, "--max-steps", 3) == 0
    assert train(*cifar_flags(cifar), *EMA, "--output-dir", out, "--resume", "auto") == 0
    assert different(exported(out), exported(ema_run)) == []
    assert different(load_file(str(list_checkpoints(out)[-1] / "ema.safetensors")),
                     load_file(str(list_checkpoints(ema_run)[-1] / "ema.safetensors"))) == []


BEST_SETTING = ["--epochs", 3, "--lr", 5.0, "--warmup-epochs", 1.5, "--eval-metric", "loss", "--keep-checkpoints", 0]


@pytest.fixture(scope="module")
def best_run(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("best") / "run"
    assert train(*cifar_flags(cifar), *BEST_SETTING, "--output-dir", out) == 0
    return out


def test_export_best_holds_the_best_epochs_weights(cifar, best_run, tmp_path):
    """A warm-up to a learning rate too high for the task: a later epoch is worse, the best epoch is not the last."""
    out = best_run
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["loss"])  # the first of equal ones, as the run chooses
    assert best["epoch"] < 3, "the setting must make an earlier epoch the best"
    assert evals[-1]["best_epoch"] == best["epoch"]
    by_step = {int(p.name.split("_")[1]): p for p in list_checkpoints(out)}
    assert different(exported(out), checkpoint_backbone(by_step[best["step"]])) == []
    assert different(exported(out), checkpoint_backbone(by_step[max(by_step)]))
    meta = read_export_metadata(out / "export")
    assert meta["exported_weights"].startswith(f"best epoch by loss: epoch {best['epoch']}")

    # the same run exporting its last weights
    last = tmp_path / "last"
    assert train(*cifar_flags(cifar), "--epochs", 3, "--lr", 5.0, "--warmup-epochs", 1.5, "--eval-metric", "loss",
                 "--export-weights", "last", "--output-dir", last) == 0
    assert different(exported(last), checkpoint_backbone(list_checkpoints(last)[-1])) == []
    assert read_export_metadata(last / "export")["exported_weights"] == "last weights"


def test_ema_refusals(cifar, tmp_path, capsys):
    assert train("--export-weights", "ema", "--max-steps", 1, "--output-dir", tmp_path / "a") == 2
    assert "--export-weights ema needs --model-ema" in capsys.readouterr().err

