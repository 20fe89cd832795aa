"""Shared by the reliability tests: tiny real runs of tools/train.py on scikit-learn's digits (no download).

resnet20_cifar at 8x8 pixels, batch 8 (179 steps per epoch; runs stop with --max-steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from script_loader import load_module
from timm_local.training.checkpoint import load_model_state

ROOT = Path(__file__).resolve().parents[1]
train_tool = load_module("_train_tool", ROOT / "tools" / "train.py")

DIGITS = ["--dataset", "digits", "--image-size", "8", "--batch-size", "8", "--workers", "0", "--trackers", "none",
          "--lr", "0.05", "--log-every", "1", "--seed", "0", "--epochs", "1"]
#: Dropout (which draws from the RNG, so a resume that lost the RNG state shows) and a checkpoint after
#: every step, all kept: the setting of the checkpoint tests' stopped-and-resumed runs.
DROPOUT = ["--model-kwargs", "{drop_rate: 0.3}", "--checkpoint-every-steps", "1", "--keep-checkpoints", "0"]


def train(*args: Any) -> int:
    """``tools/train.py`` in this process on the tiny digits setting, extra flags last (they win)."""
    return train_tool.main([*DIGITS, *map(str, args)])


def trained(tmp_path_factory: Any, name: str, *args: Any) -> Path:
    """A fresh run folder of ``train(*args)`` (which must succeed), for module-scoped fixtures."""
    out = tmp_path_factory.mktemp(name) / "run"
    assert train(*args, "--output-dir", out) == 0
    return out


def resume(out: Path, *args: Any) -> int:
    """``--resume auto`` of ``out`` with no other flag but ``args``: the run continues from its own config.yaml."""
    return train_tool.main(["--output-dir", str(out), "--resume", "auto", *map(str, args)])


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_model_state(checkpoint)


def different_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bitwise equal (all of them if the key sets differ)."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


def error_lines(err: str) -> list[str]:
    """The lines of a tool's stderr (progress bars and logging go elsewhere under pytest)."""
    return [line for line in err.splitlines() if line.strip()]
