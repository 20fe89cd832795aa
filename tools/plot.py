#!/usr/bin/env python
"""Plot learning curves of training runs from their metrics.jsonl.

    python tools/plot.py runs/cifar10-resnet32_cifar-bp runs/cifar10-resnet32_cifar-auglocal --out curves.png
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from timm_local.training.plot import plot_runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders written by tools/train.py")
    p.add_argument("--out", default="curves.png", help="image file to write (png, pdf, svg)")
    p.add_argument("--labels", nargs="*", default=None, help="legend label per run (default: model, method, d, tau)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out, labels=args.labels, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
