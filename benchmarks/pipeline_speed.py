"""Sequential vs pipelined local training (and BP): step time, speed-up, exactness.

Every measured run is a fresh process started the same way (``launch_local``: forkserver,
``--threads`` intra-op threads per process, gloo on 127.0.0.1), so "sequential" (the
sequential engine, W=1) and "pipelined" (W processes) differ only in the engine:

* ``sequential``: ``LocalModel.local_step`` in one process;
* ``bp``: the same model with method ``bp`` (end-to-end backprop) in one process;
* ``pipelined``: :class:`timm_local.engine.PipelineTrainer` over W processes.

All runs see the same synthetic batches, weights and optimizer. The step time is the
steady-state one, measured on the last rank between the end of the warm-up and the end of
the last step (so pipeline fill is excluded; the end-to-end number including it is reported
too). ``max_abs_weight_diff`` compares the pipelined run's consolidated state (weights,
heads, BatchNorm buffers) with the sequential run's after the same steps.

Beside the measurements it prints the cut, its predicted speed-up from the per-stage costs,
and the paper's A.1 estimate: with one worker per local block the ideal time ratio to BP is
(d+1)/(L+1) (L local blocks, auxiliary depth d, unit cost per layer); with W workers each
running L/W blocks it is L(d+1) / (W(L+1)).

    python benchmarks/pipeline_speed.py --model resnet32_cifar --segments 2 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import timm_local
from timm_local.engine import PipelineTrainer, launch_local, local_stage_costs

RESULTS = Path(__file__).resolve().parent / "results"


def _build(cfg: dict[str, Any], method: str) -> timm_local.LocalModel:
    torch.manual_seed(cfg["seed"])
    kwargs = {"aux_depth": cfg["aux_depth"]} if method == "auglocal" else {}
    return timm_local.create_local_model(
        cfg["model"], method, input_size=(3, cfg["image_size"], cfg["image_size"]), **kwargs
    ).train()


def _batches(cfg: dict[str, Any], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    size = cfg["image_size"]
    return [
        (torch.randn(cfg["batch_size"], 3, size, size, generator=g).to(device),
         torch.randint(0, 10, (cfg["batch_size"],), generator=g).to(device))
        for _ in range(cfg["warmup"] + cfg["steps"])
    ]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _device(cfg: dict[str, Any], rank: int) -> torch.device:
    if cfg["deterministic"]:
        # Kernels without a deterministic version (e.g. adaptive pooling backward) only warn.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if cfg["device"] == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def sequential_worker(cfg: dict[str, Any], method: str, keep_state: bool) -> dict[str, Any]:
    """One process, the sequential engine: per-step completion times (and the final state)."""
    device = _device(cfg, 0)
    model = _build(cfg, method).to(device)
    optimizer = _optimizer(model)
    batches = _batches(cfg, device)
    _sync(device)
    ends, cpu = [time.perf_counter()], [time.process_time()]
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        model.local_step(x, y)
        optimizer.step()
        _sync(device)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
    return {"ends": ends, "cpu": cpu, "state": _cpu_state(model) if keep_state else None}


def pipeline_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank of the W-stage pipeline: completion time of each step on this rank."""
    rank = dist.get_rank()
    device = _device(cfg, rank)
    model = _build(cfg, cfg["method"])
    trainer = PipelineTrainer(
        model, cfg["segments"], cost_measure=cfg["cost"], input_size=(3, cfg["image_size"], cfg["image_size"]),
        cost_batch_size=cfg["batch_size"], device=device, verbose=rank == 0,
    )
    optimizer = _optimizer(model)
    batches = _batches(cfg, device) if trainer.is_first else None
    dist.barrier()
    _sync(device)
    ends, cpu = [time.perf_counter()], [time.process_time()]
    for x, y in trainer.iterate(batches, steps=cfg["warmup"] + cfg["steps"]):
        optimizer.zero_grad(set_to_none=True)
        trainer.step(x, y)
        optimizer.step()
        _sync(device)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
    trainer.consolidate()
    report = trainer.cut_report
    return {
        "ends": ends,
        "cpu": cpu,
        "segment": trainer.segment,
        "wait_times": dict(trainer.wait_times),
        "state": _cpu_state(model) if rank == 0 else None,
        "cut": {"starts": report.starts, "costs": report.costs, "measure": report.measure,
                "segment_costs": report.segment_costs, "predicted_speedup": report.predicted_speedup},
    }


def _steady(ends: list[float], warmup: int) -> float:
    """Seconds per step after warm-up (completion to completion)."""
    return (ends[-1] - ends[warmup]) / (len(ends) - 1 - warmup)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet32_cifar")
    parser.add_argument("--method", default="auglocal")
    parser.add_argument("--aux-depth", type=int, default=3, help="AugLocal's d (counting the linear layer)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--segments", type=int, default=2, help="W, pipeline stages (processes)")
    parser.add_argument("--cost", choices=("macs", "time"), default="time", help="cost estimate for the cut")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (every run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="default: gloo on CPU; nccl if there are >= W GPUs, else gloo staging through host memory")
    parser.add_argument("--repeats", type=int, default=1, help="alternate sequential/pipelined runs this many times")
    parser.add_argument("--no-bp", action="store_true", help="skip the BP run")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels where they exist (GPU exactness check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/pipeline_speed[_cuda].json)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)

    backend = args.backend or (
        "nccl" if args.device == "cuda" and torch.cuda.device_count() >= args.segments else "gloo"
    )
    cfg = {k: getattr(args, k) for k in ("model", "method", "aux_depth", "batch_size", "image_size", "steps",
                                          "warmup", "segments", "cost", "device", "seed", "deterministic")}
    load_before = os.getloadavg()
    run = dict(threads_per_process=args.threads, timeout_s=1800)

    seq_times, pipe_times, pipe_e2e, seq_e2e, bp_times, diffs = [], [], [], [], [], []
    seq_cpu, pipe_cpu = [], []  # CPU seconds per step: what the run would take on idle cores
    cut: dict[str, Any] = {}
    waits: list[dict[str, float]] = []
    for _ in range(args.repeats):
        seq = launch_local(sequential_worker, 1, args=(cfg, args.method, True), **run)[0]
        seq_times.append(_steady(seq["ends"], args.warmup))
        seq_e2e.append(seq["ends"][-1] - seq["ends"][0])
        seq_cpu.append(_steady(seq["cpu"], args.warmup))
        ranks = launch_local(pipeline_worker, args.segments, args=(cfg,), backend=backend, **run)
        last = ranks[-1]["ends"]
        pipe_times.append(_steady(last, args.warmup))
        pipe_cpu.append(max(_steady(r["cpu"], args.warmup) for r in ranks))
        pipe_e2e.append(last[-1] - min(r["ends"][0] for r in ranks))
        diffs.append(_max_diff(ranks[0]["state"], seq["state"]))
        cut = ranks[0]["cut"]
        waits = [r["wait_times"] for r in ranks]
        if not args.no_bp:
            bp = launch_local(sequential_worker, 1, args=(cfg, "bp", False), **run)[0]
            bp_times.append(_steady(bp["ends"], args.warmup))
    load_after = os.getloadavg()

    torch.set_num_threads(args.threads)  # the MAC counts below: no OpenMP contention on a shared machine
    seq_t, pipe_t = statistics.median(seq_times), statistics.median(pipe_times)
    bp_t = statistics.median(bp_times) if bp_times else None
    model = _build(cfg, args.method)
    n_blocks, d, w = len(model.partition), args.aux_depth, args.segments
    bp_macs = sum(local_stage_costs(_build(cfg, "bp"), (3, args.image_size, args.image_size)))
    stage_macs = local_stage_costs(model, (3, args.image_size, args.image_size))
    seg_macs = [sum(stage_macs[cut["starts"][s]:(cut["starts"] + [len(stage_macs)])[s + 1]]) for s in range(w)]
    result: dict[str, Any] = {
        "model": args.model, "method": args.method, "aux_depth": d, "local_blocks": n_blocks,
        "local_stages": len(model.stages), "batch_size": args.batch_size, "image_size": args.image_size,
        "steps": args.steps, "warmup": args.warmup, "segments": w, "threads_per_process": args.threads,
        "device": args.device, "backend": backend, "repeats": args.repeats,
        "sequential_step_s": seq_t, "pipelined_step_s": pipe_t, "bp_step_s": bp_t,
        "speedup": seq_t / pipe_t,
        "speedup_end_to_end": statistics.median(seq_e2e) / statistics.median(pipe_e2e),
        "speedups_per_repeat": [s / p for s, p in zip(seq_times, pipe_times)],
        "sequential_cpu_s_per_step": statistics.median(seq_cpu),
        "pipelined_max_rank_cpu_s_per_step": statistics.median(pipe_cpu),
        "speedup_cpu_time": statistics.median(seq_cpu) / statistics.median(pipe_cpu),
        "pipelined_over_bp": pipe_t / bp_t if bp_t else None,
        "sequential_over_bp": seq_t / bp_t if bp_t else None,
        "max_abs_weight_diff": max(diffs),
        "cut": cut["starts"],
        "cut_cost_measure": cut["measure"],
        "cut_segment_cost_share": [c / sum(cut["segment_costs"]) for c in cut["segment_costs"]],
        "predicted_speedup_from_cut": cut["predicted_speedup"],
        "predicted_pipelined_over_bp_macs": max(seg_macs) / bp_macs,
        "predicted_sequential_over_bp_macs": sum(stage_macs) / bp_macs,
        "a1_ideal_ratio_vs_bp": (d + 1) / (n_blocks + 1),
        "a1_ratio_vs_bp_at_w": n_blocks * (d + 1) / (w * (n_blocks + 1)),
        "pipeline_wait_s_per_rank": waits,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpu_count": os.cpu_count(),
        "sched_autogroup": _autogroup(),
        "torch": torch.__version__,
    }
    _print_summary(result)
    out = Path(args.out) if args.out else RESULTS / ("pipeline_speed.json" if args.device == "cpu" else "pipeline_speed_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return result


def _autogroup() -> str | None:
    """This session's scheduler group and its nice (Linux autogroup): on a shared machine, nice
    of single processes does not count across sessions; `echo -15 > /proc/self/autogroup` in the
    launching shell is what lets the W processes actually get W cores."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def _print_summary(r: dict[str, Any]) -> None:
    bp = f"{r['bp_step_s']:.3f}s" if r["bp_step_s"] else "n/a"
    lines = [
        f"{r['model']} {r['method']} d={r['aux_depth']} (L={r['local_blocks']} local blocks, "
        f"{r['local_stages']} local stages), batch {r['batch_size']}, {r['image_size']}px, "
        f"{r['threads_per_process']} thread(s)/process, {r['device']} / {r['backend']}",
        f"  step time: sequential {r['sequential_step_s']:.3f}s  pipelined W={r['segments']} "
        f"{r['pipelined_step_s']:.3f}s  BP {bp}",
        f"  speed-up over sequential: {r['speedup']:.2f}x (end to end incl. fill {r['speedup_end_to_end']:.2f}x; "
        f"predicted by the cut {r['predicted_speedup_from_cut']:.2f}x)",
        f"  CPU seconds per step: sequential {r['sequential_cpu_s_per_step']:.3f}, busiest pipeline rank "
        f"{r['pipelined_max_rank_cpu_s_per_step']:.3f} -> {r['speedup_cpu_time']:.2f}x on idle cores "
        "(load-independent; excludes waiting)",
    ]
    if r["pipelined_over_bp"]:
        lines.append(
            f"  time / BP: sequential {r['sequential_over_bp']:.2f} (MACs predict "
            f"{r['predicted_sequential_over_bp_macs']:.2f}), pipelined {r['pipelined_over_bp']:.2f} "
            f"(MACs predict {r['predicted_pipelined_over_bp_macs']:.2f}; A.1 unit-cost model "
            f"{r['a1_ratio_vs_bp_at_w']:.2f} at W={r['segments']}, ideal (d+1)/(L+1) = {r['a1_ideal_ratio_vs_bp']:.3f} at W=L)"
        )
    lines.append(
        f"  cut {r['cut']} (by {r['cut_cost_measure']}), segment cost shares "
        f"{[round(s, 3) for s in r['cut_segment_cost_share']]}; max |pipelined - sequential| = {r['max_abs_weight_diff']:.3g}"
    )
    for rank, w in enumerate(r["pipeline_wait_s_per_rank"]):
        lines.append(f"  rank {rank}: in step() {w['step']:.2f}s, of which waiting: recv {w['recv']:.2f}s, "
                     f"send {w['send']:.2f}s, all-reduce {w['allreduce']:.2f}s")
    lines.append(f"  load average before {r['loadavg_before']}, after {r['loadavg_after']} on {r['cpu_count']} CPUs; "
                 f"scheduler group: {r['sched_autogroup']}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
