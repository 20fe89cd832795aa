"""Accelerate decides what it decides: mixed precision and gradient accumulation from its own configuration
(here its environment variables, which `accelerate launch` sets from the config file), an explicit flag wins,
and N accumulated micro-batches train exactly as one batch N times larger, on both engines.

Tiny on purpose (2 CPU cores): resnet20_cifar at 8x8 pixels on 16 CIFAR-10 images.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from timm_local.training import read_metrics

from tests.helpers import PIPELINE, TINY, exported, torchrun, train

TINY_CIFAR = ["--model", "resnet20_cifar", "--method", "auglocal", "--epochs", "2", "--freeze-bn"]


def saved_config(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


@pytest.mark.parametrize("flags, expected", [([], "bf16"), (["--mixed-precision", "no"], "no")])
def test_precision_from_accelerate_unless_a_flag_says_otherwise(flags, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "run"
    assert train(*flags, "--max-steps", 1, "--output-dir", out) == 0
    saved = saved_config(out)
    assert saved["mixed_precision"] == saved["runtime"]["mixed_precision"] == expected


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    far = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6)]
    assert not far, f"{len(far)} tensors differ, e.g. {far[:3]}"


@pytest.fixture(scope="module")
def one_batch(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: batches of 16 (all 16 images), one optimizer step each, eval-mode BatchNorm."""
    out = tmp_path_factory.mktemp("one_batch") / "run"
    assert train("--dataset", "cifar10", "--data-dir", cifar, *TINY_CIFAR, "--batch-size", 16,
                 "--output-dir", out) == 0
    assert saved_config(out)["grad_accum_steps"] == 1
    return out


def test_accumulation_from_accelerate_equals_one_larger_batch(cifar, one_batch, tmp_path, monkeypatch):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2: 2 micro-batches of 8 per step, the weights of steps on 16."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    out = tmp_path / "run"
    assert train("--dataset", "cifar10", "--data-dir", cifar, *TINY_CIFAR, "--batch-size", 16,
                 "--output-dir", out) == 0
    saved = saved_config(out)
    assert saved["grad_accum_steps"] == 2 and saved["runtime"]["per_process_batch"] == 8
    assert saved["runtime"]["steps_per_epoch"] == 1
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2]
    assert_close_weights(exported(out), exported(one_batch))


def test_an_explicit_accumulation_flag_wins(cifar, one_batch, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    out = tmp_path / "run"
    assert train("--dataset", "cifar10", "--data-dir", cifar, *TINY_CIFAR, "--batch-size", 16,
                 "--grad-accum-steps", 2, "--output-dir", out) == 0
    assert saved_config(out)["grad_accum_steps"] == 2
    assert_close_weights(exported(out), exported(one_batch))


def test_accumulation_that_does_not_divide_the_batch_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--batch-size", 8, "--grad-accum-steps", 3, "--max-steps", 1, "--output-dir", out) == 2
    assert "3 gradient accumulation steps" in capsys.readouterr().err and not out.exists()


def test_pipeline_accumulation_equals_one_larger_batch(cifar, one_batch, tmp_path):
    """Two pipeline segments in two processes, 2 micro-batches per step: the sequential weights of steps on 16."""
    out = tmp_path / "run"
    proc = torchrun(2, [*TINY, "--dataset", "cifar10", "--data-dir", cifar, *TINY_CIFAR, "--batch-size", 16,
                        "--grad-accum-steps", 2, *PIPELINE, "--output-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saved_config(out)["grad_accum_steps"] == 2
    assert_close_weights(exported(out), exported(one_batch))


@pytest.mark.slow
def test_dist_bn_makes_the_processes_batchnorm_statistics_one(cifar, tmp_path):
    """Two data-parallel processes: --dist-bn reduce checkpoints the average of their BatchNorm statistics,
    broadcast process 0's; the parameters (trained on batch statistics) are the same either way."""
    from timm_local.training import list_checkpoints
    from timm_local.training.checkpoint import load_model_state

    states = {}
    for mode in ("reduce", "broadcast"):
        out = tmp_path / mode
        proc = torchrun(2, ["--image-size", "8", "--workers", "0", "--trackers", "none", "--lr", "0.05", "--seed", "0",
                            "--dataset", "cifar10", "--data-dir", cifar, "--model", "resnet20_cifar", "--method", "bp",
                            "--epochs", "1", "--batch-size", 8, "--dist-bn", mode, "--output-dir", out])
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[mode] = load_model_state(list_checkpoints(out)[-1])
    reduce, broadcast = states["reduce"], states["broadcast"]
    stats = [k for k in reduce if k.endswith(("running_mean", "running_var"))]
    params = [k for k in reduce if k not in stats and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(reduce[k], broadcast[k]) for k in params)
    assert any(not torch.equal(reduce[k], broadcast[k]) for k in stats)
