"""ImageNet-scale data: the model's own input size, a bounded start-up check, the generated ImageNet-like set.

Real parts: timm models (resnet18), real JPEG files from tools/make_fake_imagenet.py, tools/train.py in-process.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import timm_local.data as tld
import timm_local.training.loop as loop
from tests.helpers import ROOT, load_module, train_tool

fake = load_module("_make_fake_imagenet", ROOT / "tools" / "make_fake_imagenet.py")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of 500x375 JPEGs, 2 classes (ImageNet's most common file size)."""
    root = tmp_path_factory.mktemp("photos")
    return fake.make_fake_imagenet(root, classes=2, train_per_class=2, val_per_class=1, routes=["folder"],
                                   size=(500, 375))["folder"]


def test_a_timm_model_decides_the_input_size_of_a_dataset_without_recipe(photos):
    _, _, cfg = tld.create_datasets(str(photos), model="resnet18")
    net = tld.model_input("resnet18")
    assert (cfg.image_size, cfg.crop_pct, cfg.interpolation, cfg.mean) == (224, net.crop_pct, net.interpolation,
                                                                           net.mean)
    assert "resnet18's pretrained_cfg" in cfg.size_source
    _, _, small = tld.create_datasets(str(photos), model="resnet18", image_size=160)
    assert small.image_size == 160 and small.size_source.startswith("--img-size")
    # ours (*_cifar) take the files' size: built for whatever small images they are given
    _, _, ours = tld.create_datasets(str(photos), model="resnet20_cifar")
    assert ours.image_size == 500 and "image files" in ours.size_source


def _record_input_sizes(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of what reaches the backbone's first convolution, in every step and evaluation."""
    seen: list[tuple[int, ...]] = []
    build = loop.build_local_model

    def build_and_watch(cfg, data):
        lm = build(cfg, data)
        lm.backbone.conv1.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
        return lm

    monkeypatch.setattr(loop, "build_local_model", build_and_watch)
    return seen


@pytest.mark.parametrize("flags, size", [([], 224), (["--img-size", "160"], 160)])
def test_a_folder_of_photos_trains_a_timm_resnet_at_the_models_size(photos, tmp_path, monkeypatch, caplog, flags,
                                                                    size):
    seen = _record_input_sizes(monkeypatch)
    with caplog.at_level(logging.INFO):
        rc = train_tool.main(["--dataset", str(photos), "--model", "resnet18", "--method", "bp", "--batch-size", "2",
                              "--workers", "0", "--trackers", "none", "--max-steps", "1", "--no-eval-heads",
                              "--no-export", "--output-dir", str(tmp_path / "run"), *flags])
    assert rc == 0 and seen
    assert {s[1:] for s in seen} == {(3, size, size)}
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training resnet18"))
    assert f"3x{size}x{size} (size from {'--img-size' if flags else 'resnet18'}" in start


def test_start_up_opens_a_bounded_sample_of_a_large_folder(tmp_path, monkeypatch):
    """20,000 real files; start-up opens at most the sample of each split, whatever the folder's size."""
    root = tmp_path / "many"
    buf = Path(tmp_path / "one.png")
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf)
    data = buf.read_bytes()
    for split, n in (("train", 19_000), ("test", 1_000)):
        for c in range(10):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n // 10):
                (folder / f"{i}.png").write_bytes(data)
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    train, test, cfg = tld.create_datasets(str(root), model="resnet20_cifar", seed=3)
    assert len(train) == 19_000 and len(test) == 1_000 and cfg.image_size == 4
    # the sample of each split, and the first training image (its mode says the channels)
    assert 2 * tld.SAMPLE_SIZE <= len(opened) <= 2 * tld.SAMPLE_SIZE + 1
    again: list[str] = opened[:]
    opened.clear()
    tld.create_datasets(str(root), model="resnet20_cifar", seed=3)
    assert opened == again  # the sample is seeded


def test_a_broken_file_outside_the_sample_is_named_when_read(tmp_path):
    root = fake.make_fake_imagenet(tmp_path, classes=2, train_per_class=40, val_per_class=1, routes=["folder"],
                                   size=(40, 30))["folder"]
    train, _, _ = tld.create_datasets(str(root), model="resnet20_cifar")  # 80 files: more than the sample
    checked = set(tld.sample_indices(len(train), seed=0))
    index = next(i for i in range(len(train)) if i not in checked)
    path = Path(train.source.dataset.samples[index][0])
    path.write_bytes(path.read_bytes()[:50])
    tld.create_datasets(str(root), model="resnet20_cifar")  # the start-up check passes: the file is not sampled
    with pytest.raises(tld.CorruptImageError, match=str(path)):
        train[index]


def test_hf_class_count_without_class_label_reads_no_image(tmp_path, monkeypatch):
    import datasets

    images = fake.generate(3, 2, seed=0, size=(8, 8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    split = {"image": [{"bytes": d, "path": None} for _, _, d in images], "label": [lab for _, lab, _ in images]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(split, features=features),
                         test=datasets.Dataset.from_dict(split, features=features)).save_to_disk(str(tmp_path / "hf"))
    decoded: list[int] = []
    real_decode = datasets.Image.decode_example
    monkeypatch.setattr(datasets.Image, "decode_example",
                        lambda self, *a, **k: (decoded.append(1), real_decode(self, *a, **k))[1])
    splits = tld.load_image_sources(str(tmp_path / "hf"))
    assert splits.classes is None
    decoded.clear()
    assert tld.count_classes(splits) == 3 and decoded == []


# ---- the loader that keeps a GPU fed: the same values on every path ------------------------------------
@pytest.mark.parametrize("style", ["digits", "photos"])
def test_device_normalisation_equals_the_workers_bit_for_bit(style, photos):
    """uint8 from the workers + normalisation on the device (here the CPU) == ToTensor + Normalize in the worker."""
    from torch.utils.data import DataLoader

    dataset, kwargs = ("digits", dict(image_size=16)) if style == "digits" else (str(photos), dict(model="resnet18"))
    floats, _, data = tld.create_datasets(dataset, seed=1, **kwargs)
    uint8, _, _ = tld.create_datasets(dataset, seed=1, normalize=False, **kwargs)
    assert uint8[0][0].dtype == torch.uint8
    want = next(iter(DataLoader(floats, batch_size=4)))[0]
    got = next(iter(tld.DeviceBatches(DataLoader(uint8, batch_size=4), data.mean, data.std, "cpu")))[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_persistent_workers_see_each_epoch(tmp_path):
    """The epoch reaches workers that persist across epochs: their batches equal the in-process ones."""
    from torch.utils.data import DataLoader

    train, _, _ = tld.create_datasets("digits", image_size=8, seed=0)
    subset = torch.utils.data.Subset(train, range(8))
    persistent = DataLoader(subset, batch_size=8, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        got = next(iter(persistent))[0]
        assert torch.equal(got, next(iter(DataLoader(subset, batch_size=8)))[0])
    train.set_epoch(0)
    assert not torch.equal(got, next(iter(DataLoader(subset, batch_size=8)))[0])  # the epochs do differ


def test_the_resumable_sampler_drops_indices_not_batches():
    from timm_local.training.samplers import ResumableDistributedSampler

    plain = torch.utils.data.DistributedSampler(range(40), num_replicas=2, rank=1, seed=3, drop_last=True)
    resumable = ResumableDistributedSampler(range(40), num_replicas=2, rank=1, seed=3, drop_last=True)
    for s in (plain, resumable):
        s.set_epoch(2)
    resumable.skip = 8
    assert list(resumable) == list(plain)[8:] and len(resumable) == len(plain) - 8


def test_a_run_normalising_on_the_device_trains_the_same_weights(tmp_path):
    """--device-normalize on the CPU: the whole run (steps, evaluation) bitwise equal to the workers' path."""
    from tests.helpers import model_state, train
    from timm_local.training import latest_checkpoint

    states = []
    for flag in ("--no-device-normalize", "--device-normalize"):
        out = tmp_path / flag.strip("-")
        assert train("--max-steps", "3", "--output-dir", out, "--no-export", flag) == 0
        states.append(model_state(latest_checkpoint(out)))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_loader_benchmark_measures_every_case(tmp_path):
    import json

    bench = load_module("_loader_throughput", ROOT / "benchmarks" / "loader_throughput.py")
    out = tmp_path / "lt"
    assert bench.main(["--images", "20", "--rounds", "1", "--workers", "0", "--batch-size", "4", "--out",
                       str(out)]) == 0
    rates = json.loads(out.with_suffix(".json").read_text())["images_per_s"]
    assert set(rates) == set(bench.CASES) and all(r["0"] > 0 for r in rates.values())
    assert "| timm create_loader | " in out.with_suffix(".md").read_text()


def test_batches_already_on_the_device_are_normalised_in_step():
    """Accelerate's loaders track their own end (gather_for_metrics drops the padding of the last batch by
    it): a batch they placed is passed on before the next one is asked for."""
    pulled: list[int] = []

    def loader():
        for i in range(3):
            pulled.append(i)
            yield torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, i])

    batches = tld.DeviceBatches(list(loader()), (0.5,) * 3, (0.25,) * 3, "cpu")  # materialised: a plain list
    pulled.clear()
    wrapped = tld.DeviceBatches(loader(), (0.5,) * 3, (0.25,) * 3, "cpu")
    for i, (x, y) in enumerate(wrapped):
        assert pulled == list(range(i + 1)) and torch.equal(y, torch.tensor([i, i]))
        assert torch.allclose(x, torch.full_like(x, (i / 255 - 0.5) / 0.25))
    assert len(batches) == 3


def test_image_tars_read_as_the_folders_they_pack(tmp_path):
    """train.tar + val.tar holding class folders (timm's ReaderImageInTar): random access, the same samples."""
    written = fake.make_fake_imagenet(tmp_path, classes=3, train_per_class=2, val_per_class=1,
                                      routes=["folder", "tar"], size=(40, 30))
    folder, _, by_folder = tld.create_datasets(str(written["folder"]), image_size=16, seed=2)
    tars, tars_test, by_tar = tld.create_datasets(str(written["tar"]), image_size=16, seed=2)
    assert by_tar.classes == by_folder.classes and (len(tars), len(tars_test)) == (6, 3)
    assert "train.tar" in by_tar.origin
    for i in range(len(folder)):  # same order, same seeded augmentation, same pixels
        assert tars[i][1] == folder[i][1] and torch.equal(tars[i][0], folder[i][0])
