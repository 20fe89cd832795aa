"""A run folder survives what a cluster does to it: preemption signals save and resume bitwise, a second
writer is refused, a full or read-only disk loses nothing, a truncated metrics line is repaired.

Signals and the second writer are real processes (tools/train.py); the disk failures are os.write raising
the errno a full (ENOSPC) or read-only (EROFS) filesystem gives -- the tests run as root, whom chmod does not stop.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (DIGITS, ROOT, TRAIN, different_tensors, error_lines, load_module, model_state, resume,
                           subprocess_env, train, trained)
from timm_local.memory import PEAK_MEMORY_KEYS
from timm_local.training import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints, read_metrics, verify_checkpoint
from timm_local.training.checkpoint import checkpoint_step, load_state, newest_verified
from timm_local.training.lock import LOCK_NAME
from timm_local.training.preempt import PREEMPTED_EXIT

preemption = load_module("_preemption", ROOT / "benchmarks" / "preemption.py")
FLAGS = ["--model-kwargs", "{drop_rate: 0.3}", "--keep-checkpoints", "0", "--no-export"]
FINAL = 24
MEASURED = {"samples_per_s", "train_time_s", *PEAK_MEMORY_KEYS}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "straight", *FLAGS, "--max-steps", FINAL)


def _spawn(out: Path, *extra: object) -> subprocess.Popen:
    cmd = [sys.executable, str(TRAIN), *DIGITS, *FLAGS, "--max-steps", str(FINAL), "--output-dir", str(out),
           *map(str, extra)]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _errors(err: str) -> list[str]:
    """The ``error:`` lines of a tool's stderr (the progress bar writes there too)."""
    return [line for line in error_lines(err) if line.startswith("error:")]


def _step(out: Path) -> int:
    """The last step metrics.jsonl shows (complete lines only)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max([0] + [r["step"] for r in rows if r.get("kind") == "train"])


def _wait(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


def _same_run(a: Path, b: Path) -> list[str]:
    """What differs between two runs' final states: weights, optimizer state, metrics rows."""
    wrong = different_tensors(model_state(latest_checkpoint(a)), model_state(latest_checkpoint(b)))
    oa, ob = load_state(latest_checkpoint(a), "optimizer"), load_state(latest_checkpoint(b), "optimizer")
    wrong += [f"momentum {i}" for i in oa["state"] if different_tensors(oa["state"][i], ob["state"][i])]
    rows = [[{k: v for k, v in r.items() if k not in MEASURED} for r in read_metrics(run)] for run in (a, b)]
    return wrong + (["metrics"] if rows[0] != rows[1] else [])


def test_sigterm_saves_the_step_and_the_resume_is_bitwise(straight, tmp_path):
    """Two SIGTERMs in a row (the second lands while the save the first asked for is written): a verified
    checkpoint no older than the step the signal hit, exit code 75, and the resumed run ends bitwise equal to
    the uninterrupted one. (More signals: the slow test below and benchmarks/preemption.py.)"""
    out = tmp_path / "run"
    proc = _spawn(out)
    _wait(lambda: _step(out) >= 3, proc)
    hit = _step(out)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert "preempted by SIGTERM" in err and "--resume auto" in err
    found, skipped = newest_verified(out)
    assert found is not None and not skipped and hit <= checkpoint_step(found) < FINAL
    assert resume(out, "--max-steps", FINAL) == 0
    assert not _same_run(straight, out)


@pytest.mark.slow
def test_sigterm_at_random_moments_benchmark_in_small(tmp_path):
    result = preemption.main(["--signals", "5", "--epochs", "1", "--seed", "1", "--out", str(tmp_path / "work"),
                              "--report", str(tmp_path / "report")])
    assert result["signals"] == 5 and result["during_save"] >= 1 and preemption.passed(result), result
    assert (tmp_path / "report.md").is_file()


def test_a_second_run_in_the_folder_stops_at_once_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    first = _spawn(out)
    _wait(lambda: str(first.pid) in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).is_file() else ""), first)
    t0 = time.time()
    assert train(*FLAGS, "--max-steps", FINAL, "--output-dir", out, "--resume", "auto") == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "another run" in lines[0], lines
    assert time.time() - t0 < 10  # refused before reading data or building the model
    first.send_signal(signal.SIGKILL)  # the kernel releases the lock of a process that dies in any way
    first.wait()
    assert (out / LOCK_NAME).is_file()
    assert train(*FLAGS, "--max-steps", 4, "--output-dir", out, "--resume", "auto") == 0
    assert (out / LOCK_NAME).read_text() == ""  # released on exit


def _failing_writes(monkeypatch, code: int, where: str) -> list[str]:
    """os.write raising ``code`` for files whose path contains ``where`` (what a full or read-only disk does)."""
    real, failed = os.write, []

    def write(fd: int, data) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if where in path:
            failed.append(path)
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return failed


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_save_keeps_the_previous_checkpoint_and_resume_continues(code, straight, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"
    failed = _failing_writes(monkeypatch, code, ".tmp-step_00000006")
    assert train(*FLAGS, "--checkpoint-every-steps", 3, "--max-steps", FINAL, "--output-dir", out) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 1 and errno.errorcode[code] in lines[0] and failed[0] in lines[0], lines
    assert "step_00000003 is intact" in lines[0] and "--resume auto" in lines[0]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["step_00000003"]  # no half save
    verify_checkpoint(out / CHECKPOINT_DIR / "step_00000003")
    monkeypatch.undo()
    assert resume(out, "--max-steps", FINAL) == 0
    assert not _same_run(straight, out)


def test_a_failed_export_loses_nothing_and_resume_finishes_it(tmp_path, capsys, monkeypatch):
    from timm_local.training import loop

    out = tmp_path / "run"

    def disk_full(backbone, method, config, export_dir, *args):
        Path(export_dir).mkdir(parents=True)
        (Path(export_dir) / "config.json").write_text("{")  # the part written before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(export_dir) / "model.safetensors"))

    monkeypatch.setattr(loop, "export_trained", disk_full)
    assert train("--max-steps", 4, "--output-dir", out) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 1 and "ENOSPC" in lines[0] and "export/model.safetensors" in lines[0], lines
    assert not (out / "export").exists() and latest_checkpoint(out).name == "step_00000004"
    monkeypatch.undo()
    assert resume(out, "--max-steps", 4) == 0
    assert (out / "export" / "model.safetensors").is_file()


def test_a_truncated_last_metrics_line_is_repaired_on_resume(tmp_path, caplog):
    out = tmp_path / "run"
    assert train(*FLAGS, "--checkpoint-every-steps", 2, "--max-steps", 4, "--output-dir", out) == 0
    metrics = out / "metrics.jsonl"
    rows = read_metrics(out)
    metrics.write_text(metrics.read_text() + '{"kind": "train", "epoch": 0, "st')  # a crash mid-line
    assert read_metrics(out) == rows  # readers skip it
    assert resume(out, "--max-steps", 6) == 0
    assert any("truncated" in r.getMessage() for r in caplog.records)
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and [json.loads(line)["step"] for line in lines][:4] == [1, 2, 3, 4]


def test_without_flock_the_lock_file_names_the_holder_and_a_dead_one_is_stale(tmp_path, monkeypatch, caplog):
    """Some network filesystems answer flock with ENOLCK: the lock file's content is then the lock."""
    import fcntl
    import socket

    from timm_local.training.lock import RunFolderLocked, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for host, pid, refused in ((socket.gethostname(), os.getppid(), "stop it first"), ("elsewhere", 1, f"delete {lock_file}"),
                               (socket.gethostname(), dead.pid, None)):
        lock_file.write_text(json.dumps({"host": host, "pid": pid, "started": 0}))
        lock = RunLock(tmp_path)
        if refused:
            with pytest.raises(RunFolderLocked, match=re.escape(f"host {host}, pid {pid}") + ".*" + re.escape(refused)):
                lock.acquire()
            continue
        lock.acquire()  # the holder's process is gone: stale, taken over
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert any("stale lock" in r.getMessage() for r in caplog.records)
        lock.release()
