"""Peak memory as the process sees it, and step time, of BP and local learning under each CPU allocator option.

The live-tensor accounting says AugLocal needs a tenth of BP's activation memory; what a user sees is
the process's resident memory, and there the host ``malloc`` decides how much of the saving is left
(docs/memory.md). This script measures it the way a user would: every (allocator option, method) case
runs in its own fresh process, builds the model and an SGD optimizer, takes one warm-up and ``--steps``
timed SGD steps (``local_step`` + ``optimizer.step()``), and reports

* the process-level activation peak: peak RSS over the steps minus the RSS before the first step;
* the live-tensor peak of one step (the same process, measured after the RSS peak was read);
* the step time (median wall clock; CPU time beside it), and the ratios to BP under the same option.

Cases are interleaved: each round runs every case once, in an order that rotates from round to round,
so drifting machine load hits every case alike; ratios are within one run. Options differ in the
environment a process starts with (``LD_PRELOAD``, ``GLIBC_TUNABLES``), in the launcher (PyTorch's
``torch.backends.xeon.run_cpu``, the route ``make run`` uses) and in the memory format. Writes
``<out-dir>/real_memory_<model>.md`` and ``.json``, with the machine and its load. Example::

    make allocator      # tcmalloc + jemalloc where missing; the run_cpu route needs .venv/lib/libtcmalloc.so
    python benchmarks/real_memory.py                       # ResNet-110, batch 256, 2 threads, every option
    python benchmarks/real_memory.py --options glibc,run_cpu+tcmalloc+cl --methods bp,auglocal:2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from method_specs import MethodSpec, parse_methods
from results_io import write_results
from timm_local.cost import describe_machine
from timm_local.process_cost import StepCase, measure_step_case

DEFAULT_METHODS = "bp,checkpoint,dgl,auglocal:2,auglocal:4,auglocal:6"
MARKER = "REAL_MEMORY_RESULT "
#: The issue's targets for the recommended route: AugLocal d=2 activation memory and step time.
TARGET_MEMORY_RATIO = 0.2  # process-level AugLocal d=2 / BP, same option
TARGET_TIME_RATIO = 1.1  # AugLocal d=2 step time / its step time on today's default (glibc, contiguous)


@dataclass(frozen=True)
class AllocatorOption:
    """How the case's process is started: extra environment, launcher, memory format, compile."""

    name: str
    description: str
    env: dict[str, str] = field(default_factory=dict)
    preload: Optional[str] = None  # tcmalloc | jemalloc: LD_PRELOAD=<venv>/lib/lib<name>.so (`make allocator`)
    launcher: bool = False  # python -m torch.backends.xeon.run_cpu --enable-tcmalloc (finds <venv>/lib/libtcmalloc.so)
    channels_last: bool = False
    torchcompile: Optional[str] = None
    autocast: Optional[str] = None  # bf16 | fp16
    unset: tuple[str, ...] = ()  # environment variables the process must start without
    only: tuple[str, ...] = ()  # run just these methods (labels) under this option; () = every method
    in_default: bool = True  # part of the default --options


PAIR = ("bp", "auglocal d=2")  # the side-by-side options run these two; today's and the recommended route run all
OPTIONS = {o.name: o for o in (
    AllocatorOption("glibc", "glibc malloc, default settings (today's default)"),
    AllocatorOption("glibc+cl", "glibc malloc, channels-last", channels_last=True, only=PAIR),
    AllocatorOption("glibc-mmap64k", "glibc, GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536 (every block >= 64 KiB "
                    "mapped and unmapped)", env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, only=PAIR),
    AllocatorOption("jemalloc", "jemalloc 5 (LD_PRELOAD), default settings", preload="jemalloc", only=PAIR),
    AllocatorOption("jemalloc-tuned", "jemalloc 5 (LD_PRELOAD), MALLOC_CONF=oversize_threshold:0,background_thread:true "
                    "(large blocks cached like small ones instead of purged at once)", preload="jemalloc",
                    env={"MALLOC_CONF": "oversize_threshold:0,background_thread:true"}, only=PAIR),
    AllocatorOption("tcmalloc", "tcmalloc-minimal (LD_PRELOAD)", preload="tcmalloc", only=PAIR),
    AllocatorOption("tcmalloc+cl", "tcmalloc-minimal (LD_PRELOAD), channels-last", preload="tcmalloc",
                    channels_last=True, only=PAIR),
    AllocatorOption("run_cpu+tcmalloc+cl", "python -m torch.backends.xeon.run_cpu --enable-tcmalloc, channels-last "
                    "(the README's route)", launcher=True, channels_last=True),
    AllocatorOption("run_cpu+tcmalloc+cl+compile", "the README's route with --torchcompile inductor (each block and "
                    "head compiled; the warm-up step compiles)", launcher=True, channels_last=True,
                    torchcompile="inductor", only=PAIR, in_default=False),
)}
_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
#: CUDA (--device cuda): the caching allocator's settings, memory format and precision.
CUDA_OPTIONS = {o.name: o for o in (
    AllocatorOption("cuda-default", "CUDA caching allocator, default settings", unset=_CONF),
    AllocatorOption("cuda-expandable", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (tools/train.py's default)",
                    env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, unset=_CONF[1:]),
    AllocatorOption("cuda-expandable+cl+bf16", "expandable segments, channels-last, bf16 autocast",
                    env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, unset=_CONF[1:],
                    channels_last=True, autocast="bf16"),
)}
#: The option the targets are checked on, and the reference for the time target.
RECOMMENDED, TODAY = "run_cpu+tcmalloc+cl", "glibc"


def case_command(option: AllocatorOption, case: StepCase, venv: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one case's fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in option.unset} | option.env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    library = venv / "lib" / f"lib{option.preload or 'tcmalloc'}.so"  # what `make allocator` links there
    if (option.preload or option.launcher) and not library.exists():
        raise SystemExit(f"option {option.name!r} needs {library}: run `make allocator` (tools/install_allocator.sh), "
                         f"or leave the option out with --options")
    if option.preload:
        env["LD_PRELOAD"] = str(library)
    worker = [str(Path(__file__).resolve()), "--case", json.dumps(asdict(case))]
    if not option.launcher:
        return [sys.executable, *worker], env
    env["VIRTUAL_ENV"] = str(venv)  # run_cpu looks for lib/libtcmalloc.so there
    return [sys.executable, "-m", "torch.backends.xeon.run_cpu", "--enable-tcmalloc", *worker], env


def run_case(option: AllocatorOption, case: StepCase, venv: Path, timeout: float) -> dict[str, Any]:
    command, env = case_command(option, case, venv)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {option.name} / {case.method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def without_paths(text: str) -> str:
    """Folders dropped from every path-like word: results name programs, not where this machine keeps them."""
    return " ".join(Path(word).name if "/" in word and not word.startswith("{") else word for word in text.split())


def busy(lines: list[str], min_cpu: float = 5.0, words: int = 5) -> list[str]:
    """``ps`` rows (``%CPU ELAPSED ARGS``) of processes using at least ``min_cpu`` %, cut to their first words."""
    rows = []
    for line in lines:
        fields = line.split()
        if fields and float(fields[0]) >= min_cpu:
            rows.append(without_paths(" ".join(fields[:2 + words])))
    return rows


def other_processes() -> list[str]:
    """The processes busy on the machine right now (what else ran while measuring)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    return busy(out)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    methods = parse_methods(args.methods)
    options = [{**OPTIONS, **CUDA_OPTIONS}[name] for name in args.options.split(",")]
    size = (3, args.input_size, args.input_size)
    cases = [(o, m) for o in options for m in methods if not o.only or m.label in o.only]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {(o.name, m.label): [] for o, m in cases}
    load_before, processes_before = os.getloadavg(), other_processes()
    for r in range(args.rounds):
        shift = (r * 7) % len(cases)  # rotate: no case always first, none always after the same neighbour
        for option, spec in cases[shift:] + cases[:shift]:
            case = StepCase(args.model, spec.method, spec.kwargs, num_classes=args.num_classes, input_size=size,
                            batch_size=args.batch_size, steps=args.steps, warmup=1, threads=args.threads,
                            device=args.device, channels_last=option.channels_last, torchcompile=option.torchcompile,
                            autocast=option.autocast, seed=args.seed)
            t0 = time.perf_counter()
            result = run_case(option, case, args.venv, args.case_timeout)
            result["load_after"] = round(os.getloadavg()[0], 2)  # 1-minute load: what shared the cores
            samples[(option.name, spec.label)].append(result)
            print(f"[round {r + 1}/{args.rounds}] {option.name:20s} {spec.label:13s} "
                  f"process {result['process_peak_memory_bytes'] / 2**20:7.1f} MB  live "
                  f"{result['peak_memory_bytes'] / 2**20:7.1f} MB  step {result['step_time_s']:.2f} s  "
                  f"({result['allocator']}, {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    rows = summarise(samples, options, methods)
    return {
        "model": args.model, "input_size": list(size), "batch_size": args.batch_size, "threads": args.threads,
        "timed_steps": args.steps, "rounds": args.rounds, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": without_paths(" ".join(["benchmarks/real_memory.py", *args.argv])).replace(
            "real_memory.py", "benchmarks/real_memory.py", 1),
        "device": args.device,
        "machine": {**describe_machine(args.device), "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()],
                    "busiest_processes_before": processes_before, "busiest_processes_after": other_processes()},
        "options": {o.name: asdict(o) for o in options},
        "rows": rows,
        "targets": targets(rows),
    }


def summarise(samples: dict[tuple[str, str], list[dict[str, Any]]], options: list[AllocatorOption],
              methods: list[MethodSpec]) -> dict[str, dict[str, Any]]:
    """Per option and method: medians over the rounds, and ratios to BP under the same option."""
    rows: dict[str, dict[str, Any]] = {}
    for option in options:
        for spec in methods:
            runs = samples.get((option.name, spec.label))
            if not runs:
                continue
            wall = [t for run in runs for t in run["step_wall_s"]]
            cpu = [t for run in runs for t in run["step_cpu_s"]]
            rows[f"{option.name} | {spec.label}"] = {
                "option": option.name, "method": spec.label, "allocator": runs[0]["allocator"],
                "threads": runs[0]["threads"],
                "process_peak_mb": round(statistics.median(r["process_peak_memory_bytes"] for r in runs) / 2**20, 1),
                "process_peak_mb_runs": [round(r["process_peak_memory_bytes"] / 2**20, 1) for r in runs],
                "rss_before_step_mb": round(statistics.median(r["rss_before_step_bytes"] for r in runs) / 2**20, 1),
                "live_peak_mb": round(statistics.median(r["peak_memory_bytes"] for r in runs) / 2**20, 1),
                **({"process_allocated_mb": round(statistics.median(
                    r["process_peak_allocated_bytes"] for r in runs) / 2**20, 1),
                    "process_peak_mb": round(statistics.median(r["process_peak_reserved_bytes"] for r in runs) / 2**20, 1)}
                   if "process_peak_reserved_bytes" in runs[0] else {}),
                "step_wall_s": round(statistics.median(wall), 3), "step_wall_min_s": round(min(wall), 3),
                "step_cpu_s": round(statistics.median(cpu), 3), "step_wall_samples_s": wall,
                "warmup_wall_s": round(statistics.median(w for run in runs for w in run["warmup_wall_s"]), 2),
                "load_after": [run.get("load_after") for run in runs],
            }
    for key, row in rows.items():
        bp = rows.get(f"{row['option']} | bp")
        if bp:
            row["process_ratio"] = round(row["process_peak_mb"] / bp["process_peak_mb"], 3)
            row["live_ratio"] = round(row["live_peak_mb"] / bp["live_peak_mb"], 3)
            row["time_ratio"] = round(row["step_wall_s"] / bp["step_wall_s"], 3)
        today = rows.get(f"{TODAY} | {row['method']}") or rows.get(f"cuda-default | {row['method']}")
        if today:
            row["time_vs_today"] = round(row["step_wall_s"] / today["step_wall_s"], 3)
            row["cpu_vs_today"] = round(row["step_cpu_s"] / today["step_cpu_s"], 3)
    return rows


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked on the recommended route (when both it and today's default were run)."""
    row, today = rows.get(f"{RECOMMENDED} | auglocal d=2"), rows.get(f"{TODAY} | auglocal d=2")
    if row is None or today is None:
        return {}
    return {"option": RECOMMENDED, "load_after": row.get("load_after"), "today_load_after": today.get("load_after"),
            "memory_ratio": row["process_ratio"], "memory_target": TARGET_MEMORY_RATIO,
            "memory_met": row["process_ratio"] <= TARGET_MEMORY_RATIO,
            "time_vs_today": row["time_vs_today"], "time_target": TARGET_TIME_RATIO,
            "time_met": row["time_vs_today"] <= TARGET_TIME_RATIO, "cpu_time_vs_today": row["cpu_vs_today"]}


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cuda = result["device"].startswith("cuda")
    where = f"{m['gpu']}, CUDA {m['cuda']}" if cuda else f"{result['threads']} threads, CPU"
    peak = ("max_memory_reserved over the steps minus the memory allocated before the first step (CUDA allocated "
            "beside it)" if cuda else "peak RSS over the steps minus the RSS before the first step")
    lines = [
        f"# Peak memory as the process sees it: {result['model']}, batch {result['batch_size']}, {where}",
        "",
        f"Measured {result['date']} with `{result['command']}` on {m['cpu']} ({m['cpu_count']} cores, torch "
        f"{m['torch']}). One fresh process per case; one warm-up and {result['timed_steps']} timed SGD steps "
        f"(`local_step` + `optimizer.step()`); {result['rounds']} interleaved round(s), medians. Process peak = "
        f"{peak} (activations, gradients, optimizer state and what the allocator keeps); live peak = live "
        "tensors of one step (timm_local.cost). ×BP within the same option; time ×today = the same method's step "
        f"time over today's default (`{'cuda-default' if cuda else TODAY}`). Load = the machine's 1-minute load "
        f"average after each case (before / after the run: {m['load_average_before']} / {m['load_average_after']}; "
        "busy processes in the JSON): this machine is shared, and a step timed at a load above its 2 cores was "
        "slowed by other jobs; memory is not.",
        "",
        "| option | method | process peak (MB) | ×BP | live peak (MB) | ×BP | CUDA allocated (MB) | step (s) | min (s) "
        "| ×BP | ×today | CPU s/step | load | allocator |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"].values():
        allocated = f"{r['process_allocated_mb']:.0f}" if "process_allocated_mb" in r else "–"
        lines.append(
            f"| {r['option']} | {r['method']} | {r['process_peak_mb']:.0f} | {r.get('process_ratio', float('nan')):.3f} "
            f"| {r['live_peak_mb']:.0f} | {r.get('live_ratio', float('nan')):.3f} | {allocated} | {r['step_wall_s']:.2f} "
            f"| {r['step_wall_min_s']:.2f} | {r.get('time_ratio', float('nan')):.2f} "
            f"| {r.get('time_vs_today', float('nan')):.2f} | {r['step_cpu_s']:.2f} "
            f"| {' / '.join(str(v) for v in r.get('load_after', []))} | {r['allocator']} |")
    t = result["targets"]
    if t:
        lines += [
            "",
            f"## Targets on `{t['option']}` (AugLocal d=2)",
            "",
            f"- process-level activation memory ×BP: {t['memory_ratio']:.3f} (target ≤ {t['memory_target']}): "
            f"{'met' if t['memory_met'] else 'missed'}",
            f"- step time ×today's default: {t['time_vs_today']:.2f} wall, {t['cpu_time_vs_today']:.2f} CPU "
            f"(target ≤ {t['time_target']}): {'met' if t['time_met'] else 'missed'} (1-minute load after the two "
            f"cases: {t.get('load_after')} vs {t.get('today_load_after')}; above ~2, other jobs shared the cores)",
        ]
    lines += ["", "## Options", ""] + [f"- `{o['name']}`: {o['description']}" for o in result["options"].values()]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet110_cifar")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every case")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma list, first bp; name:d sets aux_depth")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then --options come from the CUDA list)")
    parser.add_argument("--options", default=None, help=f"comma list of: {', '.join(OPTIONS)} (CPU); "
                        f"{', '.join(CUDA_OPTIONS)} (CUDA); default: all of the device's")
    parser.add_argument("--steps", type=int, default=3, help="timed SGD steps per case (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (every case once per round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix), help="where run_cpu finds lib/libtcmalloc.so")
    parser.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case process")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default=None, help="results file stem (default: real_memory_<model>[_cuda])")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # worker mode: one StepCase as JSON
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        case["input_size"] = tuple(case["input_size"]) if case["input_size"] else None
        print(MARKER + json.dumps(measure_step_case(StepCase(**case))), flush=True)
        return {}
    known = CUDA_OPTIONS if args.device.startswith("cuda") else OPTIONS
    args.options = args.options or ",".join(name for name, o in known.items() if o.in_default)
    unknown = [o for o in args.options.split(",") if o not in known]
    if unknown or args.steps < 1 or args.rounds < 1 or args.batch_size < 2:
        parser.error(f"unknown --options {unknown} for {args.device}; choose from {', '.join(known)}" if unknown
                     else "need --steps >= 1, --rounds >= 1 and --batch-size >= 2")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = measure(args)
    stem = args.out_dir / (args.name or f"real_memory_{args.model}{'_cuda' if args.device.startswith('cuda') else ''}")
    write_results(stem, result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
