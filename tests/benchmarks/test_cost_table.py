"""benchmarks/cost_table.py on a tiny configuration: it measures, writes, and its ratios are consistent."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "cost_table.py"


@pytest.fixture(scope="module")
def cost_table():
    spec = importlib.util.spec_from_file_location("cost_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_table"] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("cost_table", None)


def test_cost_table_writes_consistent_markdown_and_json(cost_table, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        cost_table.main([
            "--model", "resnet20_cifar", "--input-size", "16", "--batch-size", "4", "--steps", "2",
            "--warmup", "0", "--threads", "1", "--methods", "bp,checkpoint,dgl,infopro,auglocal:2",
            "--process-steps", "0", "--out-dir", str(tmp_path),  # the process-level peak: the next test
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "cost_table_resnet20_cifar_cpu.json").read_text())
    markdown = (tmp_path / "cost_table_resnet20_cifar_cpu.md").read_text()
    rows = result["rows"]
    assert list(rows) == ["bp", "checkpoint", "dgl", "infopro", "auglocal d=2"]
    bp = rows["bp"]
    assert bp["time_ratio"] == bp["memory_ratio"] == bp["step_macs_ratio"] == 1.0
    assert bp["step_gmacs"] == pytest.approx(3 * bp["gmacs"], rel=0.05)  # forward + ~2x backward
    assert rows["checkpoint"]["step_gmacs"] == pytest.approx(4 * bp["gmacs"], rel=0.05)  # + recompute
    assert rows["checkpoint"]["peak_memory_mb"] < bp["peak_memory_mb"]
    assert rows["infopro"]["gmacs_train"] > rows["infopro"]["gmacs"] > bp["gmacs"]
    assert rows["auglocal d=2"]["aux_params"] > 0 and rows["auglocal d=2"]["paper"]["time_ratio"] == 1.872
    for row in rows.values():
        assert len(row["step_cpu_s"]) == len(row["step_wall_s"]) == 2 and row["median_step_time_s"] > 0
        assert row["time_ratio"] == pytest.approx(row["median_step_cpu_s"] / bp["median_step_cpu_s"], rel=1e-3)
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["torch_threads"] == 1
    assert result["machine"]["cpu"] and result["timer"] == "cpu"
    assert set(result["profile"]) == {"bp", "auglocal d=2"} and result["profile"]["bp"]["convolution"] > 0
    assert "| auglocal d=2 |" in markdown and "## Goals" in markdown and "## Machine" in markdown


def test_cost_table_rejects_bad_method_lists(cost_table) -> None:
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        cost_table.parse_methods("bp,nope")
    with pytest.raises(SystemExit, match="must start with 'bp'"):
        cost_table.parse_methods("dgl,bp")
    specs = cost_table.parse_methods("bp,auglocal:4")
    assert [s.label for s in specs] == ["bp", "auglocal d=4"] and specs[1].kwargs == {"aux_depth": 4}


def test_cost_table_reports_the_process_level_peak_beside_the_live_one(cost_table, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        cost_table.main([
            "--model", "resnet20_cifar", "--input-size", "16", "--batch-size", "4", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--methods", "bp,auglocal:2", "--process-steps", "1", "--no-profile",
            "--out-dir", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "cost_table_resnet20_cifar_cpu.json").read_text())
    markdown = (tmp_path / "cost_table_resnet20_cifar_cpu.md").read_text()
    bp, auglocal = result["rows"]["bp"], result["rows"]["auglocal d=2"]
    assert bp["process_memory_ratio"] == 1.0 and result["process_steps"] == 1
    for row in (bp, auglocal):
        # a fresh process's growth over its steps holds at least the momentum buffers and the gradients
        assert row["process_peak_memory_mb"] * 2**20 >= 4 * (row["params"] + row["aux_params"])
        assert row["rss_before_step_mb"] > 0 and row["allocator"] == result["machine"]["allocator"]
    assert auglocal["process_memory_ratio"] == pytest.approx(
        auglocal["process_peak_memory_mb"] / bp["process_peak_memory_mb"], rel=1e-3)
    assert "## Peak memory as the process sees it" in markdown and "| auglocal d=2 |" in markdown
