"""End-to-end training through tools/train.py: every on-disk format, resume, refusal, data parallel.

(The non-finite stop is tested on both engines in tests/training/test_runners.py.)

Tiny on purpose (2 CPU cores shared): resnet20_cifar at 8x8 pixels, 16 training images, batch 8.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import timm
import timm_local
from timm_local.export import load_exported, pretrained_cfg_overlay, read_export_metadata
from timm_local.training import (CHECKPOINT_DIR, TMP_PREFIX, latest_checkpoint, list_checkpoints,
                                 read_checkpoint_meta, read_metrics)
from timm_local.training.checkpoint import load_state

from tests.helpers import (ROOT, TINY, comparable_rows, model_state, subprocess_env, train_tool,
                           write_hf_disk, write_imagefolder, write_mnist_idx)

def run_train(*args: str) -> int:
    return train_tool.main([*TINY, *map(str, args)])


@pytest.fixture(scope="module")
def datasets_root(cifar, tmp_path_factory) -> Path:
    """The session's tiny CIFAR-10 beside tiny sets in the other formats tools/train.py reads."""
    root = tmp_path_factory.mktemp("data")
    (root / "cifar").symlink_to(cifar)
    write_mnist_idx(root / "fmnist", n_train=16, n_test=8)
    write_hf_disk(root / "hf", n_train=16, n_test=8, size=16)
    write_imagefolder(root / "folders", n_train=16, n_test=8, size=16, classes=3)
    return root


FORMATS = {
    "cifar10_pickle": lambda r: ["--dataset", "cifar10", "--data-dir", r / "cifar"],
    "mnist_idx_gz": lambda r: ["--dataset", "fashion_mnist", "--data-dir", r / "fmnist"],
    "hf_save_to_disk": lambda r: ["--dataset", r / "hf"],
    "imagefolder": lambda r: ["--dataset", r / "folders"],
}


@pytest.mark.parametrize("method", ["bp", "auglocal"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_trains_evaluates_checkpoints_and_exports_what_timm_loads(fmt, method, datasets_root, tmp_path):
    out = tmp_path / "run"
    trackers = ["--trackers", "tensorboard"] if (fmt, method) == ("cifar10_pickle", "auglocal") else []
    rc = run_train(*FORMATS[fmt](datasets_root), "--method", method, "--epochs", "1", "--max-steps", "2",
                   "--output-dir", out, *trackers)
    assert rc == 0
    rows = read_metrics(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["local_losses"])).all() for r in train_rows)
    n_heads = len(train_rows[0]["head_train_top1"])
    assert len(train_rows[0]["local_losses"]) == n_heads + 1
    assert (n_heads == 0) == (method == "bp")
    assert len(evals) == 1 and 0.0 <= evals[0]["top1"] <= 100.0 and evals[0]["samples"] == 8
    assert len(evals[0].get("head_top1", [])) == n_heads
    assert rows[-1]["kind"] == "summary" and rows[-1]["step"] == 2

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == method and cfg["runtime"]["steps_per_epoch"] == 2
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_00000002"
    meta = read_checkpoint_meta(ckpt)
    assert meta["method"] == method and meta["train_state"]["global_step"] == 2

    # the export is the checkpointed backbone, and timm's loaders give identical logits
    num_classes = cfg["data"]["num_classes"]
    trained = timm.create_model("resnet20_cifar", num_classes=num_classes)
    trained.load_state_dict({k[9:]: v for k, v in model_state(ckpt).items() if k.startswith("backbone.")})
    trained.eval()
    loaded = load_exported(out / "export").eval()
    by_file = timm.create_model("resnet20_cifar", pretrained=True, num_classes=num_classes,
                                pretrained_cfg_overlay=pretrained_cfg_overlay(out / "export")).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x)) and torch.equal(by_file(x), trained(x))
    assert read_export_metadata(out / "export")["method"] == method
    if trackers:
        assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard events expected"


@pytest.mark.parametrize("method", sorted(set(timm_local.list_methods()) - {"bp", "auglocal"}))
def test_every_other_method_trains_one_step(method, datasets_root, tmp_path):
    out = tmp_path / "run"
    # an AugLocal recipe with another method: aux_depth/tau are passed where taken, dropped elsewhere
    assert run_train("--dataset", datasets_root / "folders", "--method", method, "--epochs", "1", "--max-steps", "1",
                     "--aux-depth", "2", "--tau", "0.5", "--output-dir", out) == 0
    rows = read_metrics(out)
    assert [r["kind"] for r in rows] == ["train", "eval", "summary"]
    assert read_export_metadata(out / "export")["method"] == method
    assert read_checkpoint_meta(latest_checkpoint(out))["method_config"] == json.loads(
        json.dumps(yaml.safe_load((out / "config.yaml").read_text())["method_config"]))


def test_bf16_autocast_and_loader_workers(datasets_root, tmp_path):
    out = tmp_path / "run"
    assert run_train("--dataset", datasets_root / "hf", "--mixed-precision", "bf16", "--workers", "2",
                     "--epochs", "1", "--max-steps", "1", "--output-dir", out) == 0
    rows = read_metrics(out)
    assert torch.isfinite(torch.tensor(rows[0]["local_losses"])).all() and rows[-1]["kind"] == "summary"


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [2, 3], ids=["epoch_boundary", "mid_epoch"])
def test_resume_gives_identical_weights(stop_at, straight_run, stopped_run, cifar, tmp_path):
    if stop_at == 2:
        out = tmp_path / "run"
        shutil.copytree(stopped_run, out)
    else:
        out = tmp_path / "run"
        assert run_train("--dataset", "cifar10", "--data-dir", cifar, "--epochs", "2",
                         "--max-steps", str(stop_at), "--output-dir", out) == 0
    assert latest_checkpoint(out).name == f"step_{stop_at:08d}"
    assert run_train("--dataset", "cifar10", "--data-dir", cifar, "--epochs", "2",
                     "--output-dir", out, "--resume", "auto") == 0
    a, b = model_state(latest_checkpoint(straight_run)), model_state(latest_checkpoint(out))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    opt_a = load_state(latest_checkpoint(straight_run), "optimizer")
    opt_b = load_state(latest_checkpoint(out), "optimizer")
    assert all(torch.equal(opt_a["state"][i]["momentum_buffer"], opt_b["state"][i]["momentum_buffer"])
               for i in opt_a["state"])
    # the metrics history of the resumed run is the uninterrupted one (losses, lr, accuracies per step)
    ra, rb = comparable_rows(read_metrics(straight_run)), comparable_rows(read_metrics(out))
    rb = [r for r in rb if not (r["kind"] == "eval" and r["step"] == stop_at and stop_at == 3)]  # extra eval at stop
    assert ra == rb


def test_resume_refuses_other_method_and_existing_output(stopped_run, cifar, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    rc = run_train("--dataset", "cifar10", "--data-dir", cifar, "--epochs", "2",
                   "--output-dir", out, "--resume", "auto", "--method", "bp")
    err = capsys.readouterr().err
    assert rc == 2 and "Refusing to resume" in err and "method: checkpoint has 'auglocal'" in err
    rc = run_train("--dataset", "cifar10", "--data-dir", cifar, "--epochs", "2",
                   "--output-dir", out, "--resume", "auto", "--aux-depth", "2")
    assert rc == 2 and "method_config" in capsys.readouterr().err
    rc = run_train("--dataset", "cifar10", "--data-dir", cifar, "--output-dir", out)
    assert rc == 2 and "--resume auto" in capsys.readouterr().err


def test_interrupted_save_is_ignored(stopped_run):
    out_ckpts = list_checkpoints(stopped_run)
    junk = stopped_run / CHECKPOINT_DIR / f"{TMP_PREFIX}step_00000099"
    junk.mkdir()
    (junk / "optimizer.bin").write_bytes(b"half written")
    try:
        assert list_checkpoints(stopped_run) == out_ckpts and latest_checkpoint(stopped_run).name == "step_00000002"
    finally:
        shutil.rmtree(junk)


def test_console_says_the_data_d_and_tau_used_and_one_line_per_epoch(tmp_path, caplog, capsys):
    """The default dataset is named as the default at start; config.yaml's top level records what was used."""
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="timm_local")
    assert run_train("--batch-size", "512", "--epochs", "2", "--output-dir", out) == 0  # digits: 2 steps/epoch
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert len(start) == 1 and "with auglocal (aux_depth=3, tau=0.5) on digits (the default" in start[0]
    assert f"run folder {out}" in start[0]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]  # beside "done:"
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for line, row in zip(lines, evals):
        assert f"test top-1 {row['top1']:.2f}%" in line and line.endswith(f"run folder {out}")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["dataset"], saved["aux_depth"], saved["tau"]) == ("digits", 3, 0.5)
    # and the run resumes from that config.yaml as it is (the filled-in values are no change)
    assert run_train("--batch-size", "512", "--output-dir", out, "--resume", "auto", "--epochs", "3") == 0
    assert [r["epoch"] for r in read_metrics(out) if r["kind"] == "eval"] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# multi-process data parallel
# ------------------------------------------------------------------------------------------------
def test_two_processes_on_half_batches_equal_one_process(cifar, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), 4 images each, == 1 process on the 8-image batch.

    BatchNorm runs on running statistics (--freeze-bn): with batch statistics, 4-image and 8-image
    batches normalise differently, which DDP does not hide either (only SyncBN would, and it is GPU-only).
    """
    common = [*TINY, "--dataset", "cifar10", "--data-dir", str(cifar), "--epochs", "1",
              "--freeze-bn"]
    one, two = tmp_path / "one", tmp_path / "two"
    script = str(ROOT / "tools" / "train.py")
    bindir = Path(sys.executable).parent
    launcher = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    proc = subprocess.run([*launcher, script, *common, "--output-dir", str(two)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_tool.main([*common, "--output-dir", str(one)]) == 0  # the 1-process reference, in this process
    assert yaml.safe_load((two / "config.yaml").read_text())["runtime"]["num_processes"] == 2
    assert yaml.safe_load((two / "config.yaml").read_text())["runtime"]["per_process_batch"] == 4
    a, b = model_state(latest_checkpoint(one)), model_state(latest_checkpoint(two))
    from accelerate.utils import set_seed

    set_seed(0)
    init = timm_local.create_local_model("resnet20_cifar", method="auglocal", num_classes=10,
                                         input_size=(3, 8, 8)).state_dict()
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved > 1e-3, "the run did not train; the comparison would be vacuous"
    assert diff < 1e-5, f"2-process update differs from the 1-process one by {diff}"


@pytest.mark.slow
def test_kill_during_training_then_resume(cifar, straight_run, tmp_path):
    """SIGKILL a real run right after its first checkpoint lands, then resume: same final weights."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), *TINY, "--dataset", "cifar10", "--data-dir",
           str(cifar), "--epochs", "2", "--checkpoint-every-steps", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(out) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(out), "no checkpoint before the kill"
    assert run_train("--dataset", "cifar10", "--data-dir", cifar, "--epochs", "2",
                     "--output-dir", out, "--resume", "auto", "--checkpoint-every-steps", "1") == 0
    a, b = model_state(latest_checkpoint(straight_run)), model_state(latest_checkpoint(out))
    assert all(torch.equal(a[k], b[k]) for k in a)
