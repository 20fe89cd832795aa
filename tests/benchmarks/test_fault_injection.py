"""benchmarks/fault_injection.py in small: SIGKILL a real run a few times, resume, same bits as a straight run.

Slow (each killed process pays the interpreter and torch start-up); the full run, with its report, is
``python benchmarks/fault_injection.py`` (docs/training.md, "Fault injection").
"""
from __future__ import annotations


import pytest

from tests.helpers import ROOT, load_module

fault_injection = load_module("_fault_injection", ROOT / "benchmarks" / "fault_injection.py")


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    result = fault_injection.main(["--kills", "4", "--epochs", "1", "--seed", "1", "--out", str(tmp_path / "work"),
                                   "--report", str(tmp_path / "report")])
    assert result["kills"] == 4 and result["incomplete_folders_seen"] == 0
    assert all(result["bitwise_equal"].values()), result["bitwise_equal"]
    assert (tmp_path / "report.md").is_file()
