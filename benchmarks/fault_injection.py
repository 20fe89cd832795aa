#!/usr/bin/env python
"""Kill a real training run with SIGKILL at N random moments, resume it each time, compare with a straight run.

    python benchmarks/fault_injection.py                    # 24 kills, ~5 min on 2 CPU cores
    python benchmarks/fault_injection.py --kills 4 --epochs 1 --out /tmp/fi   # a quick look

The run: resnet20_cifar + AugLocal with dropout (so the RNG states matter) on scikit-learn's digits at 8x8,
batch 8, a checkpoint every 10 steps, the newest 2 kept. Each kill falls in one of four phases, shuffled:
``startup`` (a random moment after the launch, often before the first step: a kill right after a resume),
``train`` (a random moment while steps run), ``save`` (while a checkpoint folder is being written, i.e. a
``.tmp-*`` folder exists) and ``rotation`` (while an old checkpoint is being deleted, a ``.old-*`` folder).
To make the save and rotation windows wide enough to hit, the killed processes run with a pause around each
rename and between the files a deletion removes (``--io-pause``); that changes when things happen, never what
is computed. After every kill the script checks that every ``step_*`` folder lists as complete, then resumes
with ``--resume auto``; after the last kill the run goes to its end. Pass: the final weights, optimizer
state, export and metrics rows are bitwise those of the uninterrupted run.

Writes benchmarks/results/fault_injection.{md,json}: the kills, the step each hit, what was on disk, the
checkpoint each resume started from, and the work lost per kill in steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PHASES = {"startup": 4, "train": 8, "save": 6, "rotation": 6}  # shares of the kills
CHECKPOINT_EVERY = 10


def run_flags(epochs: int) -> list[str]:
    return ["--dataset", "digits", "--image-size", "8", "--batch-size", "8", "--workers", "0", "--trackers", "none",
            "--lr", "0.05", "--log-every", "1", "--seed", "0", "--epochs", str(epochs),
            "--model-kwargs", "{drop_rate: 0.1}", "--checkpoint-every-steps", str(CHECKPOINT_EVERY),
            "--keep-checkpoints", "2"]


# ------------------------------------------------------------------------------------------------
# the child: tools/train.py with slower checkpoint file operations
# ------------------------------------------------------------------------------------------------
def slow_file_operations(pause: float) -> None:
    """Pause around every rename and between the files a tree deletion removes (wider kill windows)."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src: Any, dst: Any) -> None:
        time.sleep(pause)
        real_replace(src, dst)
        time.sleep(pause)

    def rmtree(path: Any, ignore_errors: bool = False, **kwargs: Any) -> None:
        for p in sorted(Path(path).rglob("*"), reverse=True):
            time.sleep(pause)
            if p.is_file():
                p.unlink(missing_ok=True)
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    os.replace, shutil.rmtree = replace, rmtree


def child(argv: list[str], pause: float) -> int:
    """tools/train.py in this process (tools/ is not a package), under slowed-down file operations."""
    sys.path.insert(0, str(ROOT))
    slow_file_operations(pause)
    spec = importlib.util.spec_from_file_location("_train_tool", ROOT / "tools" / "train.py")
    train_tool = importlib.util.module_from_spec(spec)
    sys.modules["_train_tool"] = train_tool  # dataclasses look their module up while the script runs
    spec.loader.exec_module(train_tool)
    return train_tool.main(argv)


# ------------------------------------------------------------------------------------------------
# the parent: launch, watch, kill, resume
# ------------------------------------------------------------------------------------------------
def spawn(out: Path, args: argparse.Namespace, resume: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--io-pause", str(args.io_pause), "--",
           *run_flags(args.epochs), "--output-dir", str(out), *(["--resume", "auto"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def steps_done(out: Path, since: float, start_step: int) -> int:
    """The last step this process completed: metrics rows written after its start (it first cuts the file back to
    the checkpoint it resumed from), else the step it started from."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_mtime < since:
        return start_step
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return max([start_step] + [r["step"] for r in rows if r.get("kind") == "train"])


def in_checkpoints(out: Path, since: Optional[float] = None) -> list[str]:
    """The entries of the checkpoints folder; with ``since``, those left over from before it are marked."""
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if since is None:
        return names
    return [n if (root / n).exists() and (root / n).stat().st_mtime >= since else f"{n} (left over)" for n in names]


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


def kill_once(out: Path, phase: str, rng: random.Random, args: argparse.Namespace, log: Path) -> Optional[dict]:
    """One life of the run, killed in ``phase``; None if it finished before the kill."""
    from timm_local.training.checkpoint import checkpoint_step, list_checkpoints, newest_verified

    start, _ = newest_verified(out)
    start_step = checkpoint_step(start) if start else 0
    t0 = time.time()
    proc = spawn(out, args, resume=True, log=log)
    training = lambda: steps_done(out, t0, start_step) > start_step  # noqa: E731
    marker = {"save": ".tmp-", "rotation": ".old-"}.get(phase)
    if phase == "startup":
        wait_until(lambda: False, proc, rng.uniform(0.2, 6.0))
    elif phase == "train":
        wait_until(training, proc, 300)
        wait_until(lambda: False, proc, rng.uniform(0.0, 1.5))
    else:
        writing = lambda: any(n.startswith(marker) and not n.endswith("(left over)")  # noqa: E731
                              for n in in_checkpoints(out, since=t0))
        hit = wait_until(lambda: training() and writing(), proc, 300)
        if hit:
            wait_until(lambda: False, proc, rng.uniform(0.0, 2 * args.io_pause))
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise RuntimeError(f"the run failed (exit code {proc.returncode}); see {log}")
        return None
    reached, on_disk = steps_done(out, t0, start_step), in_checkpoints(out, since=t0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    listed = {p.name for p in list_checkpoints(out)}
    half = [n for n in in_checkpoints(out) if n.startswith("step_") and n not in listed]
    resumed, _ = newest_verified(out)
    resumed_step = checkpoint_step(resumed) if resumed else 0
    return {"phase": phase, "seconds_after_launch": round(time.time() - t0, 3), "started_at_step": start_step,
            "killed_at_step": reached, "on_disk_at_kill": on_disk, "resumes_from_step": resumed_step,
            "steps_lost": max(0, reached - resumed_step), "incomplete_step_folders": half}


def _written(kill: dict[str, Any], prefix: str) -> bool:
    """Whether the killed process was writing a folder of ``prefix`` (not one left over by an earlier kill)."""
    return any(n.startswith(prefix) and not n.endswith("(left over)") for n in kill["on_disk_at_kill"])


def final_state(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from timm_local.memory import PEAK_MEMORY_KEYS
    from timm_local.training import latest_checkpoint, read_metrics
    from timm_local.training.checkpoint import load_state

    measured = {"samples_per_s", "train_time_s", *PEAK_MEMORY_KEYS}  # measured, not computed

    ckpt = latest_checkpoint(out)
    optimizer = load_state(ckpt, "optimizer")
    return {"checkpoint": ckpt.name,
            "model": load_state(ckpt, "model"),
            "momentum": {i: s["momentum_buffer"] for i, s in optimizer["state"].items()},
            "export": load_file(str(out / "export" / "model.safetensors")),
            "metrics": [{k: v for k, v in r.items() if k not in measured}
                        for r in read_metrics(out)]}


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    import torch

    def same(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    return {"checkpoint": a["checkpoint"] == b["checkpoint"], "model": same(a["model"], b["model"]),
            "optimizer": same(a["momentum"], b["momentum"]), "export": same(a["export"], b["export"]),
            "metrics": a["metrics"] == b["metrics"]}


def write_report(result: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lost = result["steps_lost"]
    lines = [
        "# Fault injection: SIGKILL at random moments, then --resume auto", "",
        f"Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, load before "
        f"start: {result['machine']['load']}), torch {result['machine']['torch']}; `python "
        f"benchmarks/fault_injection.py {' '.join(result['argv'])}`.", "",
        f"- run: {result['total_steps']} steps (digits 8x8, batch 8, resnet20_cifar + AugLocal, dropout 0.1), a "
        f"checkpoint every {CHECKPOINT_EVERY} steps, newest 2 kept",
        f"- kills: **{result['kills']}** ({', '.join(f'{k}: {v}' for k, v in result['phases'].items())}); "
        f"killed mid-save {result['killed_mid_save']} times, mid-deletion {result['killed_mid_rotation']} times",
        f"- work lost per kill (steps): mean {lost['mean']:.1f}, median {lost['median']}, max {lost['max']} "
        f"(a checkpoint every {CHECKPOINT_EVERY} steps bounds it, plus a save interrupted before its rename)",
        f"- `step_*` folders that did not list as complete after a kill: {result['incomplete_folders_seen']}",
        "- final state vs the uninterrupted run, bitwise: " + ", ".join(
            f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in result["bitwise_equal"].items()),
        f"- wall time {result['wall_s']:.0f} s", "",
        "*on disk at the kill*: the checkpoints folder when the process was killed; `.tmp-*` is a save in progress, "
        "`.old-*` a deletion in progress (rotation, or clearing what an earlier kill left), *(left over)* marks "
        "entries already there when the killed process started. *lost*: steps done by the killed process beyond "
        "the checkpoint the next resume starts from.", "",
        "| # | phase | s after launch | started at step | killed at step | on disk at the kill | resumed from | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(result["kill_log"], 1):
        lines.append(f"| {i} | {k['phase']} | {k['seconds_after_launch']} | {k['started_at_step']} | "
                     f"{k['killed_at_step']} | {' '.join(k['on_disk_at_kill']) or '-'} | {k['resumes_from_step']} | "
                     f"{k['steps_lost']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parser(doc: str, what: str, count: int, epochs: int, report: str) -> argparse.ArgumentParser:
    """The command line of an interruption benchmark: ``--{what}`` interruptions of a run of ``epochs``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(f"--{what}", type=int, default=count)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seed", type=int, default=0, help=f"seed of the {what} schedule")
    p.add_argument("--io-pause", type=float, default=0.03, help="seconds around renames and per deleted file")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--report", type=Path, default=RESULTS / report, help="results stem (.md, .json)")
    return p


def schedule(shares: dict[str, int], n: int, seed: int) -> tuple[list[str], random.Random]:
    """``n`` phases in proportion to ``shares``, shuffled, and the random generator that goes on drawing."""
    rng = random.Random(seed)
    phases = [ph for ph, k in shares.items() for _ in range(round(k * n / sum(shares.values())))]
    phases = (phases + ["train"] * n)[:n]
    rng.shuffle(phases)
    return phases, rng


def reference_run(args: argparse.Namespace, prefix: str) -> tuple[Path, Path, Path, Path]:
    """The work folder and the uninterrupted run in it: (work, reference, run folder to interrupt, log)."""
    work = args.out or Path(__import__("tempfile").mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    reference, out, log = work / "reference", work / "run", work / "children.log"
    if spawn(reference, args, resume=False, log=log).wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {log}")
    return work, reference, out, log


def machine(load: tuple[float, float, float]) -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load": " ".join(f"{v:.2f}" for v in load), "torch": torch.__version__}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parser(__doc__, "kills", 24, 3, "fault_injection").parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    load = os.getloadavg()
    t0 = time.time()
    work, reference, out, log = reference_run(args, "fault-injection-")
    phases, rng = schedule(PHASES, args.kills, args.seed)
    kills = []
    for phase in phases:
        record = kill_once(out, phase, rng, args, log)
        if record is None:
            break
        kills.append(record)
        print(f"kill {len(kills)}: {phase} at step {record['killed_at_step']}, resumes from "
              f"{record['resumes_from_step']} (lost {record['steps_lost']})", flush=True)
    final = spawn(out, args, resume=True, log=log)
    if final.wait() != 0:
        raise RuntimeError(f"the last resume failed; see {log}")
    resumed = final_state(out)
    equal = bitwise_equal(final_state(reference), resumed)
    lost = [k["steps_lost"] for k in kills] or [0]
    result = {
        "date": time.strftime("%Y-%m-%d"), "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": machine(load), "total_steps": resumed["metrics"][-1]["step"], "kills": len(kills),
        "phases": {ph: sum(k["phase"] == ph for k in kills) for ph in PHASES},
        "killed_mid_save": sum(_written(k, ".tmp-") for k in kills),
        "killed_mid_rotation": sum(_written(k, ".old-") for k in kills),
        "steps_lost": {"mean": float(np.mean(lost)), "median": float(np.median(lost)), "max": int(max(lost)),
                       "total": int(sum(lost))},
        "incomplete_folders_seen": sum(len(k["incomplete_step_folders"]) for k in kills),
        "bitwise_equal": equal, "wall_s": time.time() - t0, "kill_log": kills,
    }
    write_report(result, args.report)
    print(f"{len(kills)} kills, lost per kill mean {result['steps_lost']['mean']:.1f} / max {result['steps_lost']['max']} "
          f"steps; bitwise equal: {equal}; wrote {args.report}.md")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--")
        pause = float(sys.argv[sys.argv.index("--io-pause") + 1])
        sys.exit(child(sys.argv[i + 1:], pause))
    outcome = main()
    sys.exit(0 if all(outcome["bitwise_equal"].values()) and not outcome["incomplete_folders_seen"] else 1)
