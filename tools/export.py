#!/usr/bin/env python
"""Export the backbone of a training run as a timm checkpoint (model.safetensors + config.json).

    python tools/export.py runs/digits-resnet20_cifar-auglocal            # -> RUN_DIR/export/
    python tools/export.py RUN_DIR --checkpoint RUN_DIR/checkpoints/step_00000100 --out some/dir

Load it with timm (``import timm_local`` first for the *_cifar architectures):
    timm.create_model("local-dir:RUN_DIR/export", pretrained=True)

A user error is one line on stderr and exit code 2; --debug (or TIMM_LOCAL_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from timm_local.cli import ArgumentParser, command_line_errors, handle_errors, library_errors
from timm_local.training import export_run


def main(argv: Optional[Sequence[str]] = None) -> int:
    return handle_errors(run, argv, [(cls, 2) for cls in library_errors()])


def run(argv: Optional[Sequence[str]]) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder written by tools/train.py")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the run's latest)")
    p.add_argument("--out", default=None, help="export folder (default: RUN_DIR/export)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a checkpoint of the older pickle format even where it names code (only a run you trust)")
    args = p.parse_args(argv)
    path = export_run(args.run_dir, checkpoint=args.checkpoint, export_dir=args.out, trust_pickle=args.trust_pickle)
    print(f"exported to {path}; load with timm.create_model('local-dir:{path}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(handle_errors(main, None, command_line_errors()))
