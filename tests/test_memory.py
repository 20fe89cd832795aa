"""Memory as the process sees it: the probes, the process-level figure of tools/cost.py, the per-epoch peaks
training writes to metrics.jsonl and the trackers, and the CUDA allocator default of the entry point."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

from tests.helpers import ROOT, load_module, train_tool
from timm_local.memory import (CUDA_ALLOC_CONF_DEFAULT, MiB, PEAK_MEMORY_KEYS, allocator_name,
                               default_cuda_alloc_conf, format_bytes)
from timm_local.process_cost import StepCase, measure_step_case
from timm_local.training import read_metrics

cost_tool = load_module("_cost_tool", ROOT / "tools" / "cost.py")
TINY_CASE = dict(model="resnet20_cifar", method="auglocal", method_kwargs={"aux_depth": 2}, input_size=(3, 16, 16),
                 batch_size=4, steps=2, threads=1)


PEAK_PROBE = """
import torch
from timm_local.memory import MiB, peak_memory_mb, peak_rss_bytes, reset_peak_rss, rss_bytes
assert reset_peak_rss(), "Linux lets a process reset its VmHWM"
start = rss_bytes()
assert abs(peak_rss_bytes() - start) < 32 * MiB  # the reset restarts the peak at the current RSS
block = torch.ones(32 * MiB // 4)  # 32 MiB, every page written
assert peak_rss_bytes() - start >= 30 * MiB, (peak_rss_bytes() - start) / MiB
del block
raised = peak_rss_bytes()
assert reset_peak_rss() and peak_rss_bytes() < raised  # freed (mmap-sized) and forgotten by the new peak
assert set(peak_memory_mb("cpu")) == {"peak_rss_mb"} and peak_memory_mb()["peak_rss_mb"] > 0
print("ok")
"""


def test_peak_rss_follows_a_touched_allocation_and_resets() -> None:
    """In a fresh process: one that ran other tests may hold freed heap that a new block re-uses without
    growing its resident memory, which is the allocator's business, not the probe's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_allocator_name_and_units() -> None:
    assert allocator_name() in ("glibc", "tcmalloc", "jemalloc", "mimalloc")
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"


def test_cuda_alloc_conf_default_respects_the_user() -> None:
    env: dict[str, str] = {}
    assert default_cuda_alloc_conf(env) == CUDA_ALLOC_CONF_DEFAULT == env["PYTORCH_CUDA_ALLOC_CONF"]
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert default_cuda_alloc_conf(mine) == "max_split_size_mb:128" and len(mine) == 1
    newer = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert default_cuda_alloc_conf(newer) == "expandable_segments:False" and "PYTORCH_CUDA_ALLOC_CONF" not in newer


def test_measure_step_case_reports_consistent_fields() -> None:
    report = measure_step_case(StepCase(**TINY_CASE))  # in this (not fresh) process: fields, not the figure
    assert report["process_peak_memory_bytes"] == max(0, report["peak_rss_bytes"] - report["rss_before_step_bytes"])
    assert len(report["step_wall_s"]) == len(report["step_cpu_s"]) == 2 and report["step_time_s"] > 0
    assert report["peak_memory_bytes"] > 0 and report["threads"] == 1 and report["allocator"] == allocator_name()


def test_cost_tool_json_has_live_and_process_memory() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        cost_tool.main(["--model", "resnet20_cifar", "--method", "auglocal", "--aux-depth", "2", "--input-size",
                        "3", "16", "16", "--batch-size", "4", "--memory", "--steps", "1", "--threads", "1", "--json"])
    report = json.loads(out.getvalue())  # progress went to stderr: stdout is the JSON object alone
    params = report["params"] + report["aux_params"]
    assert report["peak_memory_bytes"] > 0 and report["memory_method"].startswith("live tensor")
    # the fresh process's growth holds at least the SGD momentum buffers (float32, one per parameter)
    assert report["process_peak_memory_bytes"] >= 4 * params
    assert report["peak_rss_bytes"] == report["rss_before_step_bytes"] + report["process_peak_memory_bytes"]
    assert report["allocator"] == allocator_name()  # the child inherits this process's environment
    assert report["process_memory_method"].startswith("peak RSS") and report["channels_last"] is False
    assert cost_tool.human("peak_memory_bytes", 3 * MiB) == "3.0 MiB" and cost_tool.human("step_time_s", 0.25) == "0.250 s"


def test_training_logs_each_epoch_peak_memory(cifar: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train_tool.main(["--dataset", "cifar10", "--data-dir", str(cifar), "--image-size", "8", "--batch-size", "8",
                            "--workers", "0", "--epochs", "2", "--log-every", "1", "--trackers", "tensorboard",
                            "--channels-last", "--output-dir", str(out)]) == 0
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert all(r["peak_rss_mb"] > 100 and not set(r) & set(PEAK_MEMORY_KEYS[1:]) for r in rows)  # CPU: RSS only
    for epoch in (0, 1):  # the epoch's peak so far: it never falls within an epoch
        peaks = [r["peak_rss_mb"] for r in rows if r["epoch"] == epoch]
        assert peaks == sorted(peaks)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = events.Scalars("train/peak_rss_mb")
    assert [e.step for e in logged] == [r["step"] for r in rows]
    assert [round(e.value, 1) for e in logged] == [r["peak_rss_mb"] for r in rows]
    assert (out / "export" / "model.safetensors").is_file()  # a channels-last run exports as usual
