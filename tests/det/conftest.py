"""Fixtures for the detectron2 plug-in tests: an exported timm ResNet-34 and a tiny COCO set.

Nothing here imports detectron2 when tests are collected: ``det`` (whose package imports it) is imported
inside the fixture that uses it, and each test module skips itself when detectron2 is missing (a
module-level skip in a conftest would abort the whole pytest run).
`make test` installs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import timm
import torch

@pytest.fixture(scope="session")
def resnet34_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir laid out like timm_local's training output: RUN/export/{model.safetensors,config.json}.

    Random init, but BatchNorm running statistics are randomised too, so that a loader that
    skipped them (or mixed them up) would change the features.
    """
    torch.manual_seed(0)
    model = timm.create_model("resnet34")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    run = tmp_path_factory.mktemp("run_resnet34")
    timm.models.save_for_hf(model, run / "export", safe_serialization=True)
    return run


@pytest.fixture(scope="session")
def resnet18_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of another architecture, for the mismatch error."""
    folder = tmp_path_factory.mktemp("export_resnet18")
    timm.models.save_for_hf(timm.create_model("resnet18"), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")
    from det.demo_data import make_tiny_coco  # importing det needs detectron2: only when a test runs

    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))
