"""benchmarks/real_memory.py on a tiny configuration: fresh processes per case, under the allocator each option
names, with ratios to BP within an option and results that name no folders of this machine."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_module

real_memory = load_module("real_memory", ROOT / "benchmarks" / "real_memory.py")


def test_real_memory_runs_each_case_in_a_fresh_process_under_its_allocator(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(["bash", str(ROOT / "tools" / "install_allocator.sh"), str(venv / "lib")], check=True,
                   capture_output=True)
    options = "glibc,tcmalloc" if (venv / "lib" / "libtcmalloc.so").exists() else "glibc"
    result = real_memory.main(["--model", "resnet20_cifar", "--input-size", "16", "--batch-size", "4", "--threads", "1",
                               "--methods", "bp,auglocal:2", "--options", options, "--steps", "1", "--rounds", "1",
                               "--venv", str(venv), "--out-dir", str(tmp_path / "out")])
    rows = result["rows"]
    assert list(rows) == [f"{o} | {m}" for o in options.split(",") for m in ("bp", "auglocal d=2")]
    for row in rows.values():
        assert row["allocator"] == row["option"]  # the process really ran on the option's malloc
        assert row["process_peak_mb"] > 0 and row["live_peak_mb"] > 0 and len(row["step_wall_samples_s"]) == 1
        bp = rows[f"{row['option']} | bp"]
        assert row["process_ratio"] == pytest.approx(row["process_peak_mb"] / bp["process_peak_mb"], abs=1e-3)
        assert row["time_vs_today"] == pytest.approx(
            row["step_wall_s"] / rows[f"glibc | {row['method']}"]["step_wall_s"], abs=1e-3)
    live = {row["live_peak_mb"] for row in rows.values() if row["method"] == "bp"}
    assert len(live) == 1  # the tensors need the same memory whatever the allocator
    written = (tmp_path / "out" / "real_memory_resnet20_cifar.json").read_text()
    assert json.loads(written)["rows"] == rows and str(tmp_path) not in written  # no machine paths
    assert "| glibc | auglocal d=2 |" in (tmp_path / "out" / "real_memory_resnet20_cifar.md").read_text()


def test_real_memory_refuses_what_it_cannot_measure(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="must start with 'bp'"):
        real_memory.parse_methods("auglocal:2,bp")
    option = real_memory.OPTIONS["run_cpu+tcmalloc+cl"]
    case = real_memory.StepCase("resnet20_cifar", "bp")
    with pytest.raises(SystemExit, match="make allocator"):  # no venv/lib/libtcmalloc.so to launch with
        real_memory.case_command(option, case, tmp_path)
    assert real_memory.busy(["97.0 00:12 /opt/x/bin/python /home/u/bench.py --out /tmp/r", "0.5 01:00 idle"]) == [
        "97.0 00:12 python bench.py --out r"]
