"""Datasets at scale on two processes: timm's wds/ shards and hfds/, and an HF stream (--streaming).

The generated ImageNet-like set (tools/make_fake_imagenet.py) is written as class folders, tar shards
and an HF save_to_disk folder from the same JPEG bytes, so the samples a route delivers can be compared
with the folder's, pixel for pixel. The sharding check runs the real runner (SequentialRunner over
Accelerate) in two gloo processes; the end-to-end runs are tools/train.py under torchrun.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import timm_local.data as tld
from tests.helpers import ROOT, load_module, torchrun
from timm_local.engine import launch_local

pytest.importorskip("webdataset")
fake = load_module("_make_fake_imagenet", ROOT / "tools" / "make_fake_imagenet.py")

TRAIN, BATCH = 16, 8  # 4 classes x 4 images, global batch 8: two steps per epoch, 4 images per process


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_imagenet")
    fake.make_fake_imagenet(root, classes=4, train_per_class=4, val_per_class=2, shard_size=4, size=(40, 30))
    return root


def routes(root: Path) -> dict[str, dict]:
    return {
        "wds": dict(dataset="wds/", data_dir=str(root / "wds")),
        "hfds": dict(dataset=f"hfds/{root / 'folder'}", data_dir=str(root / "hf_cache")),
        "hf_stream": dict(dataset=str(root / "hf"), streaming=True),
    }


def digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


def _epochs_seen(all_settings: dict[str, dict], out: str) -> dict[str, list[list[str]]]:
    """In each process, per route: the images of epochs 0 and 1 as the sequential runner hands them to the model."""
    from accelerate.state import AcceleratorState, GradientState

    from timm_local.config import config_from_dict
    from timm_local.training.builders import build_local_model, make_accelerator, run_datasets
    from timm_local.training.runners import SequentialRunner

    seen = {}
    for route, settings in all_settings.items():
        cfg = config_from_dict(dict(model="resnet20_cifar", image_size=16, batch_size=BATCH, workers=0,
                                    augment=False, trackers="none", **settings))
        accelerator = make_accelerator(cfg, Path(out))
        runner = SequentialRunner(cfg)
        runner.check_launch(accelerator.num_processes)
        train_set, _, data = run_datasets(cfg)
        runner.attach(accelerator, build_local_model(cfg, data), train_set, data)
        assert runner.steps_per_epoch == TRAIN // BATCH
        seen[route] = [[digest(img) for group in runner.batches(epoch, 0) for x, _ in group for img in x]
                       for epoch in (0, 1)]
        AcceleratorState._reset_state(False)  # the next route's accelerator, in the same process group
        GradientState._reset_state()
    return seen


def test_two_processes_see_each_sample_once_per_epoch(fake_imagenet, tmp_path):
    """wds/ shards, hfds/ and an HF stream: over the two processes, every sample once in each epoch."""
    folder, _, _ = tld.create_datasets(str(fake_imagenet / "folder"), image_size=16, augment=False)
    every = sorted(digest(folder[i][0]) for i in range(len(folder)))
    assert len(set(every)) == TRAIN
    per_rank = launch_local(_epochs_seen, 2, args=(routes(fake_imagenet), str(tmp_path)), timeout_s=180)
    for route in routes(fake_imagenet):
        for epoch in (0, 1):
            seen = [image for rank in per_rank for image in rank[route][epoch]]
            assert [len(rank[route][epoch]) for rank in per_rank] == [TRAIN // 2, TRAIN // 2], route
            assert sorted(seen) == every, f"{route}, epoch {epoch}: not every sample exactly once"


@pytest.mark.slow
@pytest.mark.parametrize("route", ["wds", "hfds", "hf_stream"])
def test_two_processes_train_two_steps(route, fake_imagenet, tmp_path):
    from timm_local.training import read_metrics

    settings = routes(fake_imagenet)[route]
    args = ["--dataset", settings["dataset"], "--model", "resnet20_cifar", "--img-size", "16", "--batch-size",
            str(BATCH), "--workers", "1", "--trackers", "none", "--log-every", "1", "--max-steps", "2",
            "--output-dir", tmp_path / "run", "--no-export"]
    args += ["--data-dir", settings["data_dir"]] if "data_dir" in settings else ["--streaming"]
    proc = torchrun(2, args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert [r["samples"] for r in rows if r["kind"] == "eval"] == [8]


def test_timm_specs_and_stream_errors(fake_imagenet, tmp_path):
    with pytest.raises(ValueError, match="TensorFlow"):
        tld.create_datasets("tfds/imagenet2012")
    (tmp_path / "_info.json").write_text("{}")
    with pytest.raises(ValueError, match="_info.json"):
        tld.create_datasets("wds/", str(tmp_path), model="resnet18")
    with pytest.raises(ValueError, match="--img-size"):
        tld.create_datasets(str(fake_imagenet / "hf"), streaming=True, model="resnet20_cifar")
    with pytest.raises(ValueError, match="split sizes"):
        tld.create_datasets(f"hfids/{fake_imagenet / 'folder'}", str(tmp_path / "cache"), model="resnet18")
    train, test, cfg = tld.create_datasets(str(fake_imagenet / "hf"), streaming=True, model="resnet18")
    assert (cfg.image_size, cfg.num_classes, cfg.train_size, cfg.test_size) == (224, 4, 16, 8)
    assert isinstance(train, tld.Stream) and "resnet18" in cfg.size_source
