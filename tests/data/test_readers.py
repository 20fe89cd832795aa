"""Data: every on-disk format round-trips pixel-exactly, recipes are the paper's, nothing downloads."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from timm_local import data as tld
from tests.helpers import (CLASSES, write_cifar10, write_hf_disk, write_imagefolder, write_mnist_idx, write_parquet,
                           write_stl10, write_svhn_mat)



def _pixels(source, i: int) -> np.ndarray:
    return np.asarray(source[i][0])


def test_cifar10_pickle_layout_round_trip(tmp_path):
    x, y = write_cifar10(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the root or the folder itself
        splits = tld.load_image_sources("cifar10", str(data_dir))
        assert len(splits.train) == 20 and len(splits.test) == 10
        assert splits.classes == CLASSES
        assert np.array_equal(_pixels(splits.train, 7), x[7]) and splits.train[7][1] == y[7]
        assert splits.recipe.name == "cifar10"
    # a torchvision root given as the dataset itself is recognised by its layout
    assert tld.load_image_sources(str(tmp_path)).recipe.name == "cifar10"


def test_mnist_idx_gz_and_plain(tmp_path):
    x, y = write_mnist_idx(tmp_path / "gz", gz=True)
    write_mnist_idx(tmp_path / "plain" / "FashionMNIST" / "raw", gz=False)  # torchvision's own layout
    for name, root in (("fashion_mnist", tmp_path / "gz"), ("mnist", tmp_path / "gz"),
                       ("fashion_mnist", tmp_path / "plain")):
        splits = tld.load_image_sources(name, str(root))
        assert len(splits.train) == 20 and len(splits.test) == 10
        assert np.array_equal(_pixels(splits.train, 3), x[3]) and splits.train[3][1] == y[3]
    assert tld.load_image_sources("fashion_mnist", str(tmp_path / "gz")).classes[0] == "T-shirt/top"


def test_read_idx_rejects_truncated_file(tmp_path):
    write_mnist_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        tld.read_idx(path)


def test_svhn_mat_and_stl10_binary(tmp_path):
    pytest.importorskip("scipy")
    x, y = write_svhn_mat(tmp_path / "svhn")
    splits = tld.load_image_sources("svhn", str(tmp_path / "svhn"))
    assert np.array_equal(_pixels(splits.train, 0), x[0]) and splits.train[0][1] == 0  # label 10 -> digit 0
    assert [splits.train[i][1] for i in range(10)] == y[:10].tolist()
    x, y = write_stl10(tmp_path / "stl")  # no unlabeled_X.bin: not needed
    splits = tld.load_image_sources("stl10", str(tmp_path / "stl"))
    assert np.array_equal(_pixels(splits.train, 4), x[4]) and splits.train[4][1] == y[4]
    assert splits.classes == CLASSES


def test_hf_save_to_disk_parquet_and_imagefolder(tmp_path):
    x, y = write_hf_disk(tmp_path / "hf")
    splits = tld.load_image_sources(str(tmp_path / "hf"))
    assert np.array_equal(_pixels(splits.train, 5), x[5]) and splits.train[5][1] == y[5]
    assert splits.classes == CLASSES and splits.recipe is None
    # a named dataset may live in any generic format: recipe from the name, pixels from the folder
    assert tld.load_image_sources("cifar10", str(tmp_path / "hf")).recipe.name == "cifar10"

    x, y = write_parquet(tmp_path / "pq")
    splits = tld.load_image_sources(str(tmp_path / "pq"))
    assert len(splits.train) == 20 and len(splits.test) == 10
    assert np.array_equal(_pixels(splits.train, 5), x[5]) and splits.train[5][1] == y[5]

    x, y = write_imagefolder(tmp_path / "folders", test_name="val")
    splits = tld.load_image_sources(str(tmp_path / "folders"))
    assert splits.classes == sorted(splits.classes) and len(splits.classes) == 3
    assert len(splits.train) == 20 and len(splits.test) == 10
    labels = sorted(splits.train[i][1] for i in range(20))
    assert labels == sorted(y.tolist())


def test_missing_named_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(tld.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tld.DatasetNotFoundError) as err:
        tld.load_image_sources("cifar10")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg and "--data-dir" in msg
    assert "Nothing is downloaded" in msg
    with pytest.raises(tld.DatasetNotFoundError, match="not a built-in name"):
        tld.load_image_sources("no_such_dataset")
    # an owner/name-looking typo is not sent to the hub (offline that retries for ~30 s): hf-hub: is explicit
    with pytest.raises(tld.DatasetNotFoundError, match="hf-hub:OWNER/NAME"):
        tld.load_image_sources("someone/cifar10_typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tld.DatasetNotFoundError, match="not a dataset in a supported layout"):
        tld.load_image_sources(str(tmp_path / "empty"))


def test_default_dataset_is_digits_with_fixed_split():
    train, test, cfg = tld.create_datasets(seed=0)
    assert cfg.dataset == "digits" and cfg.num_classes == 10
    assert (cfg.train_size, cfg.test_size) == (1437, 360)
    x, label = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32  # grayscale expanded to the model's 3 channels
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert cfg.mean == (0.3053,) * 3


def test_grayscale_kept_single_channel_when_model_wants_one(tmp_path):
    write_mnist_idx(tmp_path)
    train, _, cfg = tld.create_datasets("mnist", str(tmp_path), in_chans=1)
    assert train[0][0].shape == (1, 28, 28) and cfg.mean == (0.1307,)
    assert cfg.pretrained_cfg()["input_size"] == (1, 28, 28)


def test_dataset_recipes_use_the_papers_augmentation_and_statistics():
    from torchvision import transforms as T

    def kinds(tf):
        return [type(t).__name__ for t in tf.transforms]

    cifar = tld.build_transform(tld.get_recipe("cifar10"), 32, 3, is_training=True)
    crop = next(t for t in cifar.transforms if isinstance(t, T.RandomCrop))
    assert crop.padding == 4 and "RandomHorizontalFlip" in kinds(cifar)
    assert tld.get_recipe("cifar10").mean == (0.4914, 0.4822, 0.4465)
    svhn = tld.build_transform(tld.get_recipe("svhn"), 32, 3, is_training=True)
    assert next(t for t in svhn.transforms if isinstance(t, T.RandomCrop)).padding == 2
    assert "RandomHorizontalFlip" not in kinds(svhn)
    stl = tld.build_transform(tld.get_recipe("stl10"), 96, 3, is_training=True)
    assert next(t for t in stl.transforms if isinstance(t, T.RandomCrop)).size == (96, 96)
    assert kinds(tld.build_transform(tld.get_recipe("cifar10"), 32, 3, is_training=False))[-2:] == ["ToTensor",
                                                                                                     "Normalize"]
    # ImageNet: timm's random-resized crop + flip, no colour jitter; eval resize 256 + center crop 224
    train = repr(tld.build_transform(tld.get_recipe("imagenet"), 224, 3, is_training=True))
    assert "RandomResizedCrop" in train and "RandomHorizontalFlip" in train and "ColorJitter" not in train
    evalt = tld.build_transform(tld.get_recipe("imagenet"), 224, 3, is_training=False).transforms[1]
    assert "Resize(size=256" in repr(evalt) and "CenterCrop(size=(224, 224))" in repr(evalt)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    write_cifar10(tmp_path)
    a, _, _ = tld.create_datasets("cifar10", str(tmp_path), seed=3)
    b, _, _ = tld.create_datasets("cifar10", str(tmp_path), seed=3)
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.random.get_rng_state(), random.getstate())
    x1 = a[4][0]
    assert torch.equal(torch.random.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.rand(10)  # consuming the global RNG must not change augmentation
    assert torch.equal(b[4][0], x1)
    b.set_epoch(1)
    assert not torch.equal(b[4][0], x1)
    b.set_epoch(0)
    assert torch.equal(b[4][0], x1)


def test_augmentation_touches_only_the_cpu_and_python_generators(tmp_path, monkeypatch):
    """A sample's augmentation leaves every device generator alone (dropout and drop-path draw from the CUDA
    one when training on a GPU with --workers 0) and gives the images ``torch.manual_seed`` gave them."""
    write_cifar10(tmp_path)
    train, _, _ = tld.create_datasets("cifar10", str(tmp_path), seed=3)
    seeded = []
    for module, name in ((torch.cuda, "manual_seed_all"), (torch.cuda, "manual_seed"), (torch.mps, "manual_seed"),
                         (torch.xpu, "manual_seed_all"), (torch.xpu, "manual_seed")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: (seeded.append(_name), _real(*a, **k)))
    device_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    cpu_before = torch.default_generator.get_state()
    got = [train[i][0] for i in range(6)]
    assert seeded == [] and torch.equal(torch.default_generator.get_state(), cpu_before)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all() if device_states else [], device_states))
    monkeypatch.undo()
    expected = []
    for i in range(6):  # what the augmentation gave under a global torch.manual_seed of the sample's seed
        torch.manual_seed(train.sample_seed(i))
        random.seed(train.sample_seed(i))
        expected.append(train.transform(train.source[i][0]))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not all(torch.equal(got[0], g) for g in got[1:])  # augmented: the samples differ


def test_a_given_class_count_is_kept_and_one_below_the_labels_is_refused(tmp_path):
    write_imagefolder(tmp_path, classes=3)
    _, _, cfg = tld.create_datasets(str(tmp_path), num_classes=5, image_size=16)
    assert cfg.num_classes == 5 and cfg.recipe == "generic" and cfg.image_size == 16
    with pytest.raises(ValueError, match="num_classes=2"):
        tld.create_datasets(str(tmp_path), num_classes=2)
