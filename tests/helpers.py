"""What the tests share: the repository's paths, tiny real runs of the tools, launchers, dataset writers.

Every test folder imports it the same way (``from tests.helpers import ...``): ``tests`` is a package, and
pytest puts the repository root, which holds it, on ``sys.path``.

* Scripts (tools/*.py, benchmarks/*.py) are not in a package: ``load_module`` imports them by path.
* ``train`` runs tools/train.py in this process on scikit-learn's digits (no download): resnet20_cifar at
  8x8 pixels, batch 8 (179 steps per epoch; runs stop with --max-steps). ``torchrun`` runs it as several
  processes, the way a user launches data-parallel and pipeline runs.
* The dataset writers produce real files in the real layout (torchvision CIFAR pickles, IDX .gz, SVHN .mat,
  STL-10 binaries, HF save_to_disk, parquet, class folders) from the same deterministic arrays, so the
  tests can check pixel-exact round trips. Images carry a class-dependent brightness so a model can
  learn something in a few steps.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

import timm_local
from timm_local.engine import sequential_local_step
from timm_local.engine.launch import free_port
from timm_local.memory import PEAK_MEMORY_KEYS
from timm_local.training.checkpoint import load_model_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tools" / "train.py"


def load_module(name: str, path: Path) -> ModuleType:
    """Import a script (tools/*.py, benchmarks/*.py) or fixture file that is not in a package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


train_tool = load_module("_train_tool", TRAIN)
#: The version-1 run folder and its writer (tests/fixtures/make_resume_fixture.py, also run by hand).
resume_fixture = load_module("_resume_fixture", ROOT / "tests" / "fixtures" / "make_resume_fixture.py")

#: The tiny setting of every tools/train.py run in the tests: 8x8 pixels, batch 8, no workers, no trackers.
TINY = ["--image-size", "8", "--batch-size", "8", "--workers", "0", "--trackers", "none", "--lr", "0.05",
        "--log-every", "1", "--seed", "0"]
#: The tiny setting on the smallest CIFAR ResNet trained with AugLocal (the engine and multi-process tests).
TINY_RESNET = [*TINY, "--model", "resnet20_cifar", "--method", "auglocal"]
#: The pipeline engine as two segments cut by MACs (two processes under torchrun).
PIPELINE = ["--engine", "pipeline", "--pipeline-segments", "2", "--pipeline-cost", "macs"]
DIGITS = ["--dataset", "digits", *TINY, "--epochs", "1"]
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


def exported(run: Path) -> dict[str, torch.Tensor]:
    """The exported backbone weights of a run folder."""
    return load_file(str(run / "export" / "model.safetensors"))


def comparable_rows(rows: list[dict]) -> list[dict]:
    """The train and eval rows of metrics.jsonl without what is measured rather than computed (throughput,
    time, resident memory): what a resumed run must reproduce exactly."""
    measured = {"samples_per_s", "train_time_s", *PEAK_MEMORY_KEYS}
    return [{k: v for k, v in r.items() if k not in measured} for r in rows if r["kind"] in ("train", "eval")]


def error_lines(err: str) -> list[str]:
    """The lines of a tool's stderr (progress bars and logging go elsewhere under pytest)."""
    return [line for line in err.splitlines() if line.strip()]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, one intra-op thread, quiet warnings."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               **extra)
    return env


def torchrun(nproc: int, args: Sequence[object], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC tools/train.py ARGS`` on a free local port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(TRAIN), *map(str, args)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def stages_reached(model: timm_local.LocalModel, x: torch.Tensor, y: torch.Tensor) -> list[set[int]]:
    """For each backward of one sequential step, the stages whose parameters got a non-zero gradient
    (a stage owns its blocks and its head; the last stage also the network's classifier)."""
    owner = {}
    for j, stage in enumerate(model.stages):
        for index in stage.blocks:
            owner.update({id(p): j for p in model.partition.blocks[index].parameters()})
        module = stage.head if stage.head is not None else model.backbone.get_classifier()
        owner.update({id(p): j for p in module.parameters()})
    reached: list[set[int]] = []

    def backward(loss: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        loss.backward()
        reached.append({owner[id(p)] for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0})

    sequential_local_step(model.partition, model.stages, x, y, backward)
    return reached


# ------------------------------------------------------------------------------------------------
# Writers of tiny datasets in every on-disk format timm_local.data reads
# ------------------------------------------------------------------------------------------------
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_arrays(n: int, size: int, channels: int, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, H, W[, C]) and labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    base = (labels * (200 // max(num_classes - 1, 1)))[:, None, None]
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    noise = rng.integers(0, 56, size=shape)
    images = (base if channels == 1 else base[..., None]) + noise
    return images.astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``cifar-10-batches-py`` layout (5 train pickles + test + meta). Returns the train arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, size, 3, seed=1)
    xt, yt = make_arrays(n_test, size, 3, seed=2)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        entry = {"data": x[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), "labels": y[idx].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": xt.transpose(0, 3, 1, 2).reshape(n_test, -1),
                                                       "labels": yt.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    return x, y


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_idx(root: Path, n_train: int = 20, n_test: int = 10, size: int = 28, gz: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST IDX files, gzipped like Debian's dataset-fashion-mnist. Returns the train arrays."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, size, 1, seed=3)
    xt, yt = make_arrays(n_test, size, 1, seed=4)
    files = {"train-images-idx3-ubyte": x, "train-labels-idx1-ubyte": y, "t10k-images-idx3-ubyte": xt,
             "t10k-labels-idx1-ubyte": yt}
    for name, arr in files.items():
        data = _idx_bytes(arr)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return x, y


def write_svhn_mat(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` (X: H x W x C x N, y in 1..10 with 10 = digit 0)."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, 32, 3, seed=5)
    xt, yt = make_arrays(n_test, 32, 3, seed=6)
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        labels = np.where(b == 0, 10, b).reshape(-1, 1)
        savemat(root / f"{name}_32x32.mat", {"X": a.transpose(1, 2, 3, 0), "y": labels})
    return x, y


def write_stl10(root: Path, n_train: int = 10, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's ``stl10_binary`` (column-major 3x96x96 uint8 images, labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = make_arrays(n_train, 96, 3, seed=7)
    xt, yt = make_arrays(n_test, 96, 3, seed=8)
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        (folder / f"{name}_X.bin").write_bytes(a.transpose(0, 3, 2, 1).tobytes())  # N, C, W, H
        (folder / f"{name}_y.bin").write_bytes((b + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    return x, y


def _hf_dict(n_train: int, n_test: int, size: int, channels: int):
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split, n, seed in (("train", n_train, 9), ("test", n_test, 10)):
        x, y = make_arrays(n, size, channels, seed=seed)
        splits[split] = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in x], "label": y.tolist()}, features=features)
    return datasets.DatasetDict(splits), make_arrays(n_train, size, channels, seed=9)


def write_hf_disk(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32, channels: int = 3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """An HF ``DatasetDict.save_to_disk`` folder with an Image and a ClassLabel column."""
    dsdict, arrays = _hf_dict(n_train, n_test, size, channels)
    dsdict.save_to_disk(str(root))
    return arrays


def write_parquet(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The hub's parquet layout: ``data/train-00000-of-00001.parquet`` and ``data/test-...``."""
    dsdict, arrays = _hf_dict(n_train, n_test, size, 3)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, ds in dsdict.items():
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return arrays


def write_imagefolder(root: Path, n_train: int = 20, n_test: int = 10, size: int = 32, classes: int = 3,
                      test_name: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``train/<class>/*.png`` and ``test/<class>/*.png``; class folder names deliberately unsorted on disk."""
    from PIL import Image

    names = [f"c{k}_{n}" for k, n in zip(range(classes), CLASSES)][::-1]
    x, y = make_arrays(n_train, size, 3, num_classes=classes, seed=11)
    xt, yt = make_arrays(n_test, size, 3, num_classes=classes, seed=12)
    for split, (a, b) in {"train": (x, y), test_name: (xt, yt)}.items():
        for i, (img, label) in enumerate(zip(a, b)):
            folder = root / split / sorted(names)[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return x, y
