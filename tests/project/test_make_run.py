"""The CPU launch route of `make run`: PyTorch's run_cpu launcher with tcmalloc, set up by `make allocator`.

The Makefile is run for real with a throw-away VENV (so nothing is installed into the project's venv) and
this interpreter as its python; the route trains the `make run` recipe for two steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_local.training import read_metrics
from tests.helpers import ROOT

RECIPE = "configs/quick/digits_resnet20_auglocal.yaml"


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(sys.platform != "linux", reason="run_cpu and LD_PRELOAD are Linux-only; make run uses python there")
def test_make_run_trains_through_run_cpu_with_tcmalloc(tmp_path: Path) -> None:
    venv, bin_dir = tmp_path / "venv", Path(sys.executable).parent
    setup = make("allocator", f"VENV={venv}")
    assert setup.returncode == 0, setup.stderr  # never fails the build, whatever it finds
    linked = (venv / "lib" / "libtcmalloc.so").exists()
    if not linked:  # it must say why and how to install
        assert "apt-get install" in setup.stderr or "conda install" in setup.stderr, setup.stderr

    launch = make("print-launch", f"VENV={venv}", f"BIN={bin_dir}").stdout.strip()
    assert launch == f"VIRTUAL_ENV={venv} {bin_dir}/python -m torch.backends.xeon.run_cpu --enable-tcmalloc"
    planned = make("-n", "run", f"VENV={venv}", f"BIN={bin_dir}").stdout
    assert f"{launch} tools/train.py --config {RECIPE} --output-dir runs/make-run" in planned

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # one core, as every test runs (tests/conftest.py): two OpenMP threads on a shared 2-core machine spin-wait
    proc = subprocess.run(f"{launch} --ncores-per-instance 1 --ninstances 1 tools/train.py --config {RECIPE} --max-steps 2 "
                          f"--image-size 8 --log-every 1 "
                          f"--no-eval-heads --no-export --trackers none --output-dir {out}",
                          shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "tcmalloc" if linked else "glibc"
    assert f"host memory allocator: {expected}" in proc.stderr, proc.stderr[-3000:]
    if not linked:  # the run explains the route it could not take
        assert "run_cpu --enable-tcmalloc" in proc.stderr
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(r["peak_rss_mb"] > 0 for r in rows)
