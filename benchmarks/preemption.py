#!/usr/bin/env python
"""Preempt a real training run with SIGTERM at N random moments, resume it each time, compare with a straight run.

    python benchmarks/preemption.py                       # 20 signals, 4-8 min on 2 shared CPU cores
    python benchmarks/preemption.py --signals 4 --epochs 1 --out preemption-work   # a quick look

The same run as benchmarks/fault_injection.py (resnet20_cifar + AugLocal with dropout 0.1 on digits 8x8, a
checkpoint every 10 steps, the newest 2 kept, file operations slowed by ``--io-pause`` so that saves are
wide enough to hit), but the signal is the one a cluster sends before a kill: SIGTERM. Each signal falls in
one of three phases, shuffled: ``startup`` (up to 1 s after the run has taken its folder's lock and installed
its signal handlers, often before the first step),
``train`` (a random moment while steps run) and ``save`` (while a checkpoint folder is being written, a
``.tmp-*`` folder of this process exists) -- a ``save`` signal is followed by a second SIGTERM 10 ms later,
inside the same save. Each time the script checks: the process exits with code 75; the newest checkpoint that
verifies is of a step no older than the one the signal hit; every ``step_*`` folder lists as complete. Then
it resumes with ``--resume auto``; after the last signal the run goes to its end. Pass: the final weights,
optimizer state, export and metrics rows are bitwise those of the uninterrupted run.

Writes benchmarks/results/preemption.{md,json}, beside the SIGKILL figures (fault_injection.{md,json}).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import fault_injection as fi  # noqa: E402  (the run, its launcher and the final-state comparison)

PHASES = {"startup": 4, "train": 8, "save": 8}  # shares of the signals
PREEMPTED_EXIT = 75


def _lock_holder(out: Path) -> str:
    try:
        return (out / ".timm_local.lock").read_text()
    except OSError:
        return ""


def preempt_once(out: Path, phase: str, rng: random.Random, args: argparse.Namespace, log: Path) -> Optional[dict]:
    """One life of the run, preempted in ``phase``; None if it finished before the signal."""
    from timm_local.training.checkpoint import checkpoint_step, list_checkpoints, newest_verified

    start, _ = newest_verified(out)
    start_step = checkpoint_step(start) if start else 0
    t0 = time.time()
    proc = fi.spawn(out, args, resume=True, log=log)
    training = lambda: fi.steps_done(out, t0, start_step) > start_step  # noqa: E731
    if phase == "startup":  # once the run holds its folder (and watches for signals), before or at its first step
        fi.wait_until(lambda: str(proc.pid) in _lock_holder(out), proc, 300)
        fi.wait_until(lambda: False, proc, rng.uniform(0.0, 1.0))
    elif phase == "train":
        fi.wait_until(training, proc, 300)
        fi.wait_until(lambda: False, proc, rng.uniform(0.0, 1.5))
    else:
        saving = lambda: any(n.startswith(".tmp-") and not n.endswith("(left over)")  # noqa: E731
                             for n in fi.in_checkpoints(out, since=t0))
        fi.wait_until(lambda: training() and saving(), proc, 300)
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise RuntimeError(f"the run failed (exit code {proc.returncode}); see {log}")
        return None
    hit, on_disk = fi.steps_done(out, t0, start_step), fi.in_checkpoints(out, since=t0)
    proc.send_signal(signal.SIGTERM)
    second = phase == "save"
    if second:
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    listed = {p.name for p in list_checkpoints(out)}
    half = [n for n in fi.in_checkpoints(out) if n.startswith("step_") and n not in listed]
    found, skipped = newest_verified(out)
    saved = checkpoint_step(found) if found else 0
    return {"phase": phase, "seconds_after_launch": round(time.time() - t0, 3), "started_at_step": start_step,
            "signal_at_step": hit, "second_signal": second, "on_disk_at_signal": on_disk, "exit_code": code,
            "checkpoint_step": saved, "not_older": saved >= hit,
            "before_start": code == -signal.SIGTERM and hit == start_step, "skipped_on_resume": [str(p) for p, _ in skipped],
            "incomplete_step_folders": half}


def write_report(result: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Preemption: SIGTERM at random moments, then --resume auto", "",
        f"Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, load before "
        f"start: {result['machine']['load']}), torch {result['machine']['torch']}; `python "
        f"benchmarks/preemption.py {' '.join(result['argv'])}`.", "",
        f"- run: {result['total_steps']} steps (digits 8x8, batch 8, resnet20_cifar + AugLocal, dropout 0.1), a "
        f"checkpoint every {fi.CHECKPOINT_EVERY} steps, newest 2 kept (as benchmarks/results/fault_injection.md)",
        f"- signals: **{result['signals']}** ({', '.join(f'{k}: {v}' for k, v in result['phases'].items())}); "
        f"{result['during_save']} landed while a checkpoint was being written, each followed by a second SIGTERM",
        f"- exit code {PREEMPTED_EXIT} every time: {result['all_exit_75']}"
        + (f" ({result['before_start']} signals came before the handler was installed, while Python imported torch: "
           f"SIGTERM's default action ended those processes, which had nothing to save yet)"
           if result["before_start"] else ""),
        f"- the newest verified checkpoint was no older than the step the signal hit: {result['not_older']} of "
        f"{result['signals']} (work lost per signal: {result['steps_lost_max']} steps at most)",
        f"- `step_*` folders that did not list as complete after a signal: {result['incomplete_folders_seen']}; "
        f"checkpoints skipped by a resume: {result['skipped_on_resume']}",
        "- final state vs the uninterrupted run, bitwise: " + ", ".join(
            f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in result["bitwise_equal"].items()),
        f"- wall time {result['wall_s']:.0f} s", "",
        "| # | phase | s after launch | started at step | signal at step | 2nd signal | on disk at the signal | "
        "exit | checkpoint step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(result["signal_log"], 1):
        lines.append(f"| {i} | {k['phase']} | {k['seconds_after_launch']} | {k['started_at_step']} | "
                     f"{k['signal_at_step']} | {'yes' if k['second_signal'] else '-'} | "
                     f"{' '.join(k['on_disk_at_signal']) or '-'} | {k['exit_code']} | {k['checkpoint_step']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = fi.parser(__doc__, "signals", 20, 2, "preemption").parse_args(argv)
    load = os.getloadavg()
    t0 = time.time()
    work, reference, out, log = fi.reference_run(args, "preemption-")
    phases, rng = fi.schedule(PHASES, args.signals, args.seed)
    lives = []
    for phase in phases:
        record = preempt_once(out, phase, rng, args, log)
        if record is None:
            break
        lives.append(record)
        print(f"signal {len(lives)}: {phase} at step {record['signal_at_step']}, exit {record['exit_code']}, "
              f"checkpoint {record['checkpoint_step']}", flush=True)
    if fi.spawn(out, args, resume=True, log=log).wait() != 0:
        raise RuntimeError(f"the last resume failed; see {log}")
    resumed = fi.final_state(out)
    equal = fi.bitwise_equal(fi.final_state(reference), resumed)
    result = {
        "date": time.strftime("%Y-%m-%d"), "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": fi.machine(load), "total_steps": resumed["metrics"][-1]["step"], "signals": len(lives),
        "phases": {ph: sum(k["phase"] == ph for k in lives) for ph in PHASES},
        "during_save": sum(k["second_signal"] for k in lives),
        "all_exit_75": all(k["exit_code"] == PREEMPTED_EXIT for k in lives if not k["before_start"]),
        "before_start": sum(k["before_start"] for k in lives),
        "not_older": sum(k["not_older"] for k in lives),
        "steps_lost_max": max([0] + [k["signal_at_step"] - k["checkpoint_step"] for k in lives]),
        "incomplete_folders_seen": sum(len(k["incomplete_step_folders"]) for k in lives),
        "skipped_on_resume": sum(len(k["skipped_on_resume"]) for k in lives),
        "bitwise_equal": equal, "wall_s": time.time() - t0, "signal_log": lives,
    }
    write_report(result, args.report)
    print(f"{len(lives)} signals, exit 75 every time: {result['all_exit_75']}, checkpoint no older than the signal: "
          f"{result['not_older']}/{len(lives)}; bitwise equal: {equal}; wrote {args.report}.md")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def passed(result: dict[str, Any]) -> bool:
    return (all(result["bitwise_equal"].values()) and result["all_exit_75"] and result["not_older"] == result["signals"]
            and not result["incomplete_folders_seen"] and not result["skipped_on_resume"])


if __name__ == "__main__":
    sys.exit(0 if passed(main()) else 1)
