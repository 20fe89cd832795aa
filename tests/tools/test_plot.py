"""tools/plot.py on real run folders: one PNG of their curves, written beside the first run by default."""
from __future__ import annotations

import shutil

from tests.helpers import ROOT, load_module

plot_tool = load_module("_plot_tool", ROOT / "tools" / "plot.py")


def test_the_plot_tool_draws_two_runs_into_one_png(straight_run, stopped_run, tmp_path):
    out = tmp_path / "curves.png"
    assert plot_tool.main([str(straight_run), str(stopped_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_tool_writes_beside_the_first_run_not_into_the_working_directory(straight_run, tmp_path, monkeypatch,
                                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert plot_tool.main([str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list(elsewhere.iterdir()) == []
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out
