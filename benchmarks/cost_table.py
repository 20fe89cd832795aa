"""The cost table of the paper's Table 2, measured on this machine.

For one model / input size / batch size, every method (BP, BP + checkpointing, PredSim, DGL,
InfoPro, AugLocal d=2..6 by default) is built from the same seed and measured in one run:

* GMACs per sample: ``gmacs`` (backbone + auxiliary classifiers, the paper's row),
  ``gmacs_train`` (everything a training forward runs) and ``step_gmacs`` (one whole training
  step, forward + backward, counted at the ATen level: the "MAC ratio of a training step");
* parameters of the backbone and of the auxiliary networks;
* peak memory of one training step above what was live before it (``timm_local.cost``): the live-tensor
  peak, and the process-level peak of a fresh process per method (SGD steps; peak RSS minus the RSS
  before the first step on CPU, ``max_memory_reserved`` on CUDA), which depends on the allocator the
  script is launched with (docs/memory.md);
* median wall-clock time of a training step (forward + local backwards; no optimizer step),
  with the methods *interleaved* round by round (the order rotates every round) after a
  warm-up, so that drifting machine load hits every method alike.

Ratios are relative to BP and printed next to the paper's (ResNet-110, batch 1024, RTX 3090).
Writes ``<out-dir>/cost_table_<model>_<device>.md`` and ``.json`` with a description of the
machine. Example::

    python benchmarks/cost_table.py                        # ResNet-110, 32x32, batch 64, CPU
    python benchmarks/cost_table.py --device cuda --batch-size 1024
    python benchmarks/cost_table.py --model resnet32_cifar --tag modules \
        --methods bp,infopro@4,man@4,man_pp@4,hpff@4,infopro@16,man@16,hpff@16   # K local modules
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import timm_local
from method_specs import MethodSpec, parse_methods
from results_io import write_results
from timm_local.cost import (count_macs, describe_machine, macs_per_sample, median_step_time, parameter_counts,
                             peak_step_memory, profile_step)
from timm_local.process_cost import StepCase, process_step_memory

DEFAULT_METHODS = "bp,checkpoint,predsim,dgl,infopro,auglocal:2,auglocal:3,auglocal:4,auglocal:5,auglocal:6"

#: docs/spec.md §4 (Table 2): ResNet-110, CIFAR-10, batch 1024, one RTX 3090, sequential implementation.
PAPER_BP_MEMORY_GB = 9.27
PAPER: dict[str, dict[str, Any]] = {
    "bp": {"gmacs": 0.25, "time_overhead_pct": 0.0, "memory_gb": 9.27},
    "checkpoint": {"gmacs": 0.25, "time_overhead_pct": 34.1, "memory_gb": 3.03},
    "predsim": {"gmacs": 0.25, "time_overhead_pct": 65.9, "memory_gb": 1.54},
    "dgl": {"gmacs": 0.26, "time_overhead_pct": 76.2, "memory_gb": 1.61},
    "infopro": {"gmacs": 0.34, "time_overhead_pct": 292.3, "memory_gb": 3.98},
    # the paper gives AugLocal's memory as a range over d = 2..6
    "auglocal d=2": {"gmacs": 0.63, "time_overhead_pct": 87.2, "memory_gb": (1.62, 1.72)},
    "auglocal d=3": {"gmacs": 0.69, "time_overhead_pct": 115.9, "memory_gb": (1.62, 1.72)},
    "auglocal d=4": {"gmacs": 0.80, "time_overhead_pct": 135.6, "memory_gb": (1.62, 1.72)},
    "auglocal d=5": {"gmacs": 0.98, "time_overhead_pct": 180.8, "memory_gb": (1.62, 1.72)},
    "auglocal d=6": {"gmacs": 1.13, "time_overhead_pct": 214.6, "memory_gb": (1.62, 1.72)},
}

#: The issue's goals for our sequential engine (ResNet-110).
GOAL_TIME_SLACK = 1.05  # time ratio to BP <= 1.05 x the training-step MAC ratio to BP
GOAL_MEMORY_RATIO = 0.15  # AugLocal peak memory / BP peak memory


def step_case(spec: MethodSpec, args: argparse.Namespace) -> StepCase:
    """``spec`` on the table's model, size and batch: built here for the in-process rows, and again in a
    fresh process for the process-level one (:func:`timm_local.process_cost.process_step_memory`)."""
    return StepCase(args.model, spec.method, dict(spec.kwargs), num_classes=args.num_classes,
                    input_size=(3, args.input_size, args.input_size), batch_size=args.batch_size,
                    steps=args.process_steps, threads=args.threads, device=args.device, seed=args.seed)


def process_row(case: StepCase) -> dict[str, Any]:
    """The process-level peak of ``case``: SGD steps in a fresh process."""
    result = process_step_memory(case, live=False)
    row = {"process_peak_memory_mb": round(result["process_peak_memory_bytes"] / 2**20, 2),
           "rss_before_step_mb": round(result["rss_before_step_bytes"] / 2**20, 2),
           "allocator": result["allocator"], "process_memory_method": result["process_memory_method"]}
    if "process_peak_reserved_bytes" in result:
        row["process_peak_reserved_mb"] = round(result["process_peak_reserved_bytes"] / 2**20, 2)
        row["process_peak_allocated_mb"] = round(result["process_peak_allocated_bytes"] / 2**20, 2)
        row["process_peak_memory_mb"] = row["process_peak_reserved_mb"]  # what CUDA holds for the process
    return row


def step_macs(model: timm_local.LocalModel, size: tuple[int, int, int], device: torch.device, classes: int) -> float:
    """GMACs per sample of one whole training step (forward + every local backward)."""
    batch = 2  # BatchNorm1d heads need more than one sample in training mode
    x = torch.randn(batch, *size, device=device)
    y = torch.arange(batch, device=device) % classes
    model.zero_grad(set_to_none=True)
    macs = count_macs(lambda: model.local_step(x, y))
    model.zero_grad(set_to_none=True)
    return macs / batch / 1e9


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False on this machine")
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = parse_methods(args.methods)
    size = (3, args.input_size, args.input_size)
    machine = describe_machine(device)

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, *size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, timm_local.LocalModel] = {}
    for spec in specs:
        t0 = time.perf_counter()
        model = step_case(spec, args).build()
        macs = macs_per_sample(model, size)
        row: dict[str, Any] = {
            "method": spec.method,
            "kwargs": spec.kwargs,
            "stages": len(model.stages),
            **{k: round(v, 5) for k, v in macs.items()},
            "step_gmacs": round(step_macs(model, size, device, args.num_classes), 5),
            **parameter_counts(model),
        }
        mem = peak_step_memory(model, x, y)
        row["peak_memory_mb"] = round(mem["peak_memory_bytes"] / 2**20, 2)
        # every parameter's gradient is allocated during the step: a batch-independent share
        row["grads_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 2)
        row["memory_method"] = mem["memory_method"]
        model.zero_grad(set_to_none=True)
        rows[spec.label], models[spec.label] = row, model
        print(f"[setup] {spec.label:15s} gmacs {row['gmacs']:.3f}  train {row['gmacs_train']:.3f}  "
              f"step {row['step_gmacs']:.3f}  mem {row['peak_memory_mb']:.1f} MB  ({time.perf_counter() - t0:.1f}s)",
              flush=True)

    labels = list(models)
    for spec, label in zip(specs, labels):
        if args.process_steps:
            rows[label].update(process_row(step_case(spec, args)))
            print(f"[process] {label:15s} {rows[label]['process_peak_memory_mb']:.1f} MB above the RSS before the "
                  f"first step ({rows[label]['allocator']})", flush=True)
    for _ in range(args.warmup):
        for label in labels:
            median_step_time(models[label], x, y, steps=1, warmup=0)
    wall: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.steps):
        order = labels[r % len(labels):] + labels[: r % len(labels)]  # rotate: no fixed neighbours
        for label in order:
            c0 = time.process_time()
            wall[label].append(median_step_time(models[label], x, y, steps=1, warmup=0))
            cpu[label].append(time.process_time() - c0)
        print(f"[time] round {r + 1}/{args.steps}: "
              + ", ".join(f"{k} {wall[k][-1]:.3f}s (cpu {cpu[k][-1]:.3f}s)" for k in labels), flush=True)

    # On CPU the process's CPU time is the robust measure of work: on a shared machine wall
    # time mostly measures the other tenants. On CUDA, wall time (synchronised) is the measure.
    timer = "cpu" if device.type == "cpu" else "wall"
    bp = rows[labels[0]]
    for label in labels:
        row = rows[label]
        row["step_wall_s"] = [round(t, 5) for t in wall[label]]
        row["step_cpu_s"] = [round(t, 5) for t in cpu[label]]
        row["median_step_wall_s"] = round(statistics.median(wall[label]), 5)
        row["median_step_cpu_s"] = round(statistics.median(cpu[label]), 5)
        row["median_step_time_s"] = row[f"median_step_{timer}_s"]
    for label in labels:
        row = rows[label]
        row["time_ratio"] = round(row["median_step_time_s"] / bp["median_step_time_s"], 4)
        row["wall_ratio"] = round(row["median_step_wall_s"] / bp["median_step_wall_s"], 4)
        row["memory_ratio"] = round(_ratio(row["peak_memory_mb"], bp["peak_memory_mb"]) or float("nan"), 4)
        if "process_peak_memory_mb" in row:
            row["process_memory_ratio"] = round(
                _ratio(row["process_peak_memory_mb"], bp["process_peak_memory_mb"]) or float("nan"), 4)
        row["step_macs_ratio"] = round(row["step_gmacs"] / bp["step_gmacs"], 4)
        paper = PAPER.get(label)
        if paper:
            mem = paper["memory_gb"]
            row["paper"] = {
                **paper,
                "time_ratio": round(1 + paper["time_overhead_pct"] / 100, 4),
                "memory_ratio": (
                    [round(m / PAPER_BP_MEMORY_GB, 4) for m in mem] if isinstance(mem, tuple)
                    else round(mem / PAPER_BP_MEMORY_GB, 4)
                ),
            }
    profile = None
    if not args.no_profile:
        profile = {label: profile_step(models[label], x, y) for label in labels
                   if label == labels[0] or rows[label]["method"] == "auglocal"}
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "model": args.model,
        "input_size": list(size),
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "process_steps": args.process_steps,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/cost_table.py", *args.argv]),
        "machine": machine,
        "timer": timer,
        "goals": {"time_ratio_le_step_macs_ratio_times": GOAL_TIME_SLACK, "auglocal_memory_ratio_le": GOAL_MEMORY_RATIO},
        "rows": rows,
        "profile": profile,
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "–".join(format(v, spec) for v in value)
    return format(value, spec)


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    device = m.get("gpu", m["cpu"])
    timer = result["timer"]
    timer_text = (
        "process CPU time (on a shared CPU machine wall time mostly measures the other tenants; "
        "wall-clock medians are in the JSON and the 'wall ×BP' column)"
        if timer == "cpu" else "wall-clock time, synchronised"
    )
    lines = [
        f"# Cost table: {result['model']}, {result['input_size'][1]}×{result['input_size'][2]}, "
        f"batch {result['batch_size']}, {result['machine']['device']}",
        "",
        f"Measured {result['date']} with `{result['command']}`: methods interleaved (rotating order), "
        f"{result['warmup_rounds']} warm-up round(s), median of {result['timed_rounds']} timed rounds. "
        f"Step = forward + every local backward (no optimizer step); step time = {timer_text}. "
        "Peak memory = peak allocated during one step above what was live before it (so gradients are "
        "included, parameters are not). Step GMACs = one whole training step (forward + backward) per "
        "sample. ×BP = ratio to BP on this machine; paper = Table 2 (ResNet-110, batch 1024, RTX 3090; "
        "paper memory ×BP from GB / 9.27).",
        "",
        "| method | GMACs | GMACs train | step GMACs | params (M) | aux params (M) | peak mem (MB) | of which grads "
        "| mem ×BP | paper mem ×BP | step time (s) | time ×BP | wall ×BP | step MACs ×BP | paper time ×BP "
        "| paper GMACs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in result["rows"].items():
        paper = r.get("paper", {})
        lines.append(
            f"| {label} | {r['gmacs']:.3f} | {r['gmacs_train']:.3f} | {r['step_gmacs']:.3f} "
            f"| {r['params'] / 1e6:.3f} | {r['aux_params'] / 1e6:.3f} | {r['peak_memory_mb']:.1f} | {r['grads_mb']:.1f} "
            f"| {r['memory_ratio']:.3f} | {_fmt(paper.get('memory_ratio'))} | {r['median_step_time_s']:.3f} "
            f"| {r['time_ratio']:.2f} | {r['wall_ratio']:.2f} | {r['step_macs_ratio']:.2f} "
            f"| {_fmt(paper.get('time_ratio'), '.2f')} | {_fmt(paper.get('gmacs'), '.2f')} |"
        )
    process = {k: r for k, r in result["rows"].items() if "process_peak_memory_mb" in r}
    if process:
        first = next(iter(process.values()))
        lines += [
            "",
            f"## Peak memory as the process sees it (allocator: {first['allocator']})",
            "",
            f"Process-level = {first['process_memory_method']}; one fresh process per method, "
            f"{result['process_steps']} timed SGD steps after one warm-up. Live = the live-tensor peak above.",
            "",
            "| method | live peak (MB) | live ×BP | process-level peak (MB) | process ×BP |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {k} | {r['peak_memory_mb']:.1f} | {r['memory_ratio']:.3f} | {r['process_peak_memory_mb']:.1f} "
                  f"| {r['process_memory_ratio']:.3f} |" for k, r in process.items()]
    auglocal = {k: r for k, r in result["rows"].items() if r["method"] == "auglocal"}
    if auglocal:
        lines += [
            "",
            f"## Goals (AugLocal vs BP): time ×BP ≤ {GOAL_TIME_SLACK} × step MACs ×BP; "
            f"mem ×BP ≤ {GOAL_MEMORY_RATIO}",
            "",
            "| method | time ×BP | bound | time | mem ×BP | memory |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in auglocal.items():
            bound = GOAL_TIME_SLACK * r["step_macs_ratio"]
            t_ok = "met" if r["time_ratio"] <= bound else f"missed by {100 * (r['time_ratio'] / bound - 1):.1f} %"
            m_ok = "met" if r["memory_ratio"] <= GOAL_MEMORY_RATIO else (
                f"missed by {100 * (r['memory_ratio'] / GOAL_MEMORY_RATIO - 1):.1f} %")
            lines.append(f"| {label} | {r['time_ratio']:.2f} | {bound:.2f} | {t_ok} | {r['memory_ratio']:.3f} | {m_ok} |")
    if result.get("profile"):
        profile = result["profile"]
        groups = list(next(iter(profile.values())))
        bp_label = next(iter(profile))
        kind = "self CPU time" if timer == "cpu" else "self CUDA kernel time"
        lines += [
            "",
            f"## Where the time goes (one profiled step, {kind} in s; ×BP in brackets)",
            "",
            "| method | " + " | ".join(groups) + " | step MACs ×BP |",
            "|---|" + "---|" * (len(groups) + 1),
        ]
        for label, row in profile.items():
            cells = []
            for g in groups:
                ref = profile[bp_label].get(g, 0.0)
                cells.append(f"{row[g]:.3f}" + (f" ({row[g] / ref:.2f})" if label != bp_label and ref > 0 else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {result['rows'][label]['step_macs_ratio']:.2f} |")
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += ["", f"Device: {device}. Memory measured with: {next(iter(result['rows'].values()))['memory_method']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet110_cifar", help="timm model name (ours: *_cifar)")
    parser.add_argument("--input-size", type=int, default=32, help="square input side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list, first must be bp; name:d sets aux_depth, name@K local_modules")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step per method per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", action="store_true", help="skip the per-op-group profile of bp and auglocal")
    parser.add_argument("--process-steps", type=int, default=2,
                        help="timed SGD steps of each method's fresh process for the process-level peak (0: skip it)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: leave cudnn.benchmark off")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the results files (a second table beside the default one)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --batch-size >= 2 (BatchNorm1d heads)")

    result = measure(args)
    device = torch.device(args.device).type
    stem = args.out_dir / (f"cost_table_{args.model}_{device}" + (f"_{args.tag}" if args.tag else ""))
    write_results(stem, result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
