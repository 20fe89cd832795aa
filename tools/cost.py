#!/usr/bin/env python
"""Training cost of one model + local learning method, as one JSON object.

    python tools/cost.py --model resnet110_cifar --method auglocal --aux-depth 3 --tau 0.5 --json
    python tools/cost.py --model resnet110_cifar --method bp --memory --time --batch-size 128
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import timm_local
from timm_local.cli import ArgumentParser, command_line_errors, handle_errors
from timm_local.cost import cost_report


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet110_cifar")
    p.add_argument("--method", default="auglocal", choices=timm_local.list_methods())
    p.add_argument("--aux-depth", type=int, default=None, help="the paper's d, counting the final linear layer")
    p.add_argument("--tau", type=float, default=None, help="pyramidal depth coefficient in [0, 1]")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="default: the model's pretrained_cfg input size")
    p.add_argument("--batch-size", type=int, default=64, help="for --memory and --time")
    p.add_argument("--memory", action="store_true", help="measure peak memory of one training step")
    p.add_argument("--time", action="store_true", help="measure the median training-step time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model = timm_local.create_local_model(
        args.model, args.method, aux_depth=args.aux_depth, tau=args.tau,
        num_classes=args.num_classes, input_size=args.input_size,
    ).to(args.device)
    report = cost_report(
        model, input_size=args.input_size, batch_size=args.batch_size,
        memory=args.memory, timing=args.time,
    )
    report = {"model": args.model, "method": args.method, **model.method_config, **report}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":  # a user error is one line on stderr, exit code 2 (--debug: the traceback)
    sys.exit(handle_errors(lambda argv: main(), None, command_line_errors()))
