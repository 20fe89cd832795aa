#!/usr/bin/env python
"""Training cost of one model + local learning method, as one JSON object.

    python tools/cost.py --model resnet110_cifar --method auglocal --aux-depth 3 --tau 0.5 --json
    python tools/cost.py --model resnet110_cifar --method bp --memory --time --batch-size 128

--memory reports two peaks (docs/memory.md): the live-tensor peak of one step in this process
(``peak_memory_bytes``), and the process-level peak of SGD steps in a fresh process above its
resident memory before the first step (``process_peak_memory_bytes``; on CUDA also
``process_peak_reserved_bytes`` beside ``process_peak_allocated_bytes``). The fresh process inherits
this one's environment, so run this command under the launcher you train with (docs/memory.md):

    python -m torch.backends.xeon.run_cpu --enable-tcmalloc tools/cost.py --model resnet110_cifar \
        --method auglocal --aux-depth 2 --batch-size 256 --memory --channels-last

Progress goes to stderr; stdout is the report (``--json``: one JSON object, sizes in bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import timm_local
from timm_local.cli import ArgumentParser, command_line_errors, handle_errors
from timm_local.cost_report import cost_report
from timm_local.process_cost import StepCase
from timm_local.memory import format_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet110_cifar")
    p.add_argument("--method", default="auglocal", choices=timm_local.list_methods())
    p.add_argument("--aux-depth", type=int, default=None, help="the paper's d, counting the final linear layer")
    p.add_argument("--tau", type=float, default=None, help="pyramidal depth coefficient in [0, 1]")
    p.add_argument("--local-modules", type=int, default=None,
                   help="K local modules of consecutive blocks (default: every block is a module)")
    p.add_argument("--local-module-ends", type=int, nargs="+", default=None, metavar="END",
                   help="explicit last block index of each local module")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="default: the model's pretrained_cfg input size")
    p.add_argument("--batch-size", type=int, default=64, help="for --memory and --time")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of a training step: live tensors, and process-level in a fresh process")
    p.add_argument("--steps", type=int, default=2, help="--memory: timed SGD steps of the fresh process (after 1 warm-up)")
    p.add_argument("--time", action="store_true", help="measure the median training-step time")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (timm's flag)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compile each block and head (timm's flag; default backend inductor)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1:
        p.error("need --batch-size >= 2 (BatchNorm1d heads) and --steps >= 1")
    return args


def human(key: str, value: Any) -> str:
    """A report value for people: byte counts in KiB/MiB/GiB, seconds with their unit."""
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return format_bytes(value)
    if key.endswith("_s") and isinstance(value, float):
        return f"{value:.3f} s"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    measure(parse_args(argv))
    return 0


def measure(args: argparse.Namespace) -> None:
    """Print the report of ``args`` (``--json``: as one JSON object; progress goes to stderr)."""
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[cost {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {k: v for k, v in (("aux_depth", args.aux_depth), ("tau", args.tau), ("local_modules", args.local_modules),
                                ("local_module_ends", args.local_module_ends)) if v is not None}
    case = StepCase(args.model, args.method, kwargs, num_classes=args.num_classes,
                    input_size=tuple(args.input_size) if args.input_size else None, batch_size=args.batch_size,
                    steps=args.steps, threads=args.threads, device=args.device, channels_last=args.channels_last,
                    torchcompile=args.torchcompile)
    progress(f"building {args.model} + {args.method} on {args.device}")
    model = case.build()
    report = cost_report(model, input_size=case.input_size, batch_size=args.batch_size, memory=args.memory,
                         timing=args.time, case=case, progress=progress)
    report = {"model": args.model, "method": args.method, **model.method_config, **report,
              "channels_last": args.channels_last, "torchcompile": args.torchcompile}
    progress("done")
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {human(key, value)}")


if __name__ == "__main__":  # a user error is one line on stderr, exit code 2 (--debug: the traceback)
    sys.exit(handle_errors(main, None, command_line_errors()))
