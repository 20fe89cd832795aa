#!/usr/bin/env python
"""Plot learning curves of training runs from their metrics.jsonl.

    python tools/plot.py runs/make-run                      # writes runs/make-run/curves.png
    python tools/plot.py runs/cifar10-resnet32_cifar-bp runs/cifar10-resnet32_cifar-auglocal --out curves.png

Without --out the image goes beside the runs: into the first run folder, as curves.png.

A user error is one line on stderr and exit code 2; --debug (or TIMM_LOCAL_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from timm_local.cli import ArgumentParser, command_line_errors, handle_errors
from timm_local.training.plot import plot_runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    return handle_errors(run, argv, command_line_errors())


def run(argv: Optional[Sequence[str]]) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders written by tools/train.py")
    p.add_argument("--out", default=None, help="image file to write (png, pdf, svg); default: curves.png in the "
                   "first run folder")
    p.add_argument("--labels", nargs="*", default=None, help="legend label per run (default: model, method, d, tau)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    out = plot_runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "curves.png", labels=args.labels,
                    title=args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
