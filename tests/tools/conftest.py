"""Two runs of tools/train.py on the tiny CIFAR-10 that the tool tests read: straight and stopped."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, train_tool


def _train_cifar(cifar: Path, out: Path, *args: str) -> None:
    assert train_tool.main([*TINY, "--dataset", "cifar10", "--data-dir", str(cifar), "--epochs", "2", *args,
                            "--output-dir", str(out)]) == 0


@pytest.fixture(scope="module")
def straight_run(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 epochs (4 steps) without interruption: the reference."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train_cifar(cifar, out)
    return out


@pytest.fixture(scope="module")
def stopped_run(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after epoch 1 (as a kill after the epoch's checkpoint would leave it)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    _train_cifar(cifar, out, "--max-steps", "2")
    return out
