"""`make run`'s recipe at several thread counts: wall time, training time and test top-1 of each run.

Why: on a small CPU the intra-op thread count decides both how long the demo takes and its exact result.
Each run is deterministic for a given thread count, but a different count splits the reductions of
convolutions and BatchNorm differently, so the float sums round differently and the runs drift apart
(docs/training.md). This script runs the recipe as a user would (`tools/train.py`, one fresh process per
run, interleaved rounds so machine load hits every case alike) with ``OMP_NUM_THREADS`` set per case,
optionally through PyTorch's CPU launcher with tcmalloc (the route ``make run`` uses), and writes
``<out-dir>/quick_run_threads.{md,json}``::

    python benchmarks/quick_run_threads.py                     # threads 1 and 2, plain and launcher, 2 rounds
    python benchmarks/quick_run_threads.py --threads 1 --rounds 1 --no-launcher
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from results_io import write_results
from timm_local.training import read_metrics
from timm_local.cost import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/quick/digits_resnet20_auglocal.yaml"


def case_command(threads: int, launcher: bool, venv: Path) -> tuple[list[str], dict[str, str]]:
    """How one run starts with ``threads`` intra-op threads: the command prefix and the environment it adds.

    run_cpu sets ``OMP_NUM_THREADS`` itself (to the cores it pins), so it is told the count instead; it finds
    tcmalloc in ``venv``/lib.
    """
    if launcher:
        return ([sys.executable, "-m", "torch.backends.xeon.run_cpu", "--enable-tcmalloc",
                 f"--ncores-per-instance={threads}"], {"VIRTUAL_ENV": str(venv)})
    return [sys.executable], {"OMP_NUM_THREADS": str(threads)}


def run_case(threads: int, launcher: bool, venv: Path, work: Path) -> dict[str, Any]:
    """One training run of the recipe in a fresh process: wall time, training time, top-1 from metrics.jsonl."""
    out = work / f"t{threads}{'-launcher' if launcher else ''}-{time.monotonic_ns()}"
    prefix, env = case_command(threads, launcher, venv)
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    cmd = [*prefix, str(ROOT / "tools" / "train.py"), "--config", str(ROOT / RECIPE), "--output-dir", str(out),
           "--trackers", "none"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed (threads={threads}, launcher={launcher}):\n{proc.stderr[-3000:]}")
    summary = next(r for r in reversed(read_metrics(out)) if r["kind"] == "summary")
    return {"threads": threads, "launcher": launcher, "wall_s": round(wall, 1),
            "train_time_s": round(summary["train_time_s"], 1), "top1": summary["top1"],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# `make run`'s recipe by thread count ({RECIPE})", "",
             f"Measured {result['measured']} with `benchmarks/quick_run_threads.py {' '.join(result['argv'])}` on "
             f"{result['machine']['cpu']} ({result['machine']['cpu_count']} cores). One fresh `tools/train.py` "
             "process per run, rounds interleaved; wall = the whole command (imports, data, model, training, "
             "export), training = the loop's own clock (metrics.jsonl summary). Load = 1-minute load average "
             "after the run.", "",
             "| threads | route | round | wall (s) | training (s) | test top-1 (%) | load after |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        route = "run_cpu + tcmalloc" if r["launcher"] else "python"
        lines.append(f"| {r['threads']} | {route} | {r['round']} | {r['wall_s']} | {r['train_time_s']} | "
                     f"{r['top1']:.2f} | {r['load_after'][0]} |")
    lines += ["", "Same thread count, same result: " + ("yes" if result["deterministic_per_threads"] else "NO"), ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma list of OMP_NUM_THREADS values")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-launcher", action="store_true", help="plain python only")
    p.add_argument("--venv", type=Path, default=Path(sys.prefix), help="where run_cpu finds lib/libtcmalloc.so")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    launchers = [False] if args.no_launcher else [False, True]
    if not args.no_launcher and not (args.venv / "lib" / "libtcmalloc.so").exists():
        raise SystemExit(f"no {args.venv / 'lib' / 'libtcmalloc.so'} for the launcher: run `make allocator` first, "
                         "or pass --no-launcher")
    cases = [(t, launcher) for t in threads for launcher in launchers]
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for t, launcher in cases[r % len(cases):] + cases[:r % len(cases)]:  # rotate the order per round
                row = {**run_case(t, launcher, args.venv, Path(work)), "round": r + 1}
                print(json.dumps(row), flush=True)
                runs.append(row)
    by_threads: dict[int, set[float]] = {}
    for r in runs:
        by_threads.setdefault(r["threads"], set()).add(r["top1"])
    result = {"measured": _dt.datetime.now().isoformat(timespec="seconds"), "argv": argv or sys.argv[1:],
              "recipe": RECIPE, "machine": describe_machine(), "runs": runs,
              "deterministic_per_threads": all(len(v) == 1 for v in by_threads.values())}
    write_results(args.out_dir / "quick_run_threads", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
