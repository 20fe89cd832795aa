#!/usr/bin/env python
"""Publish a run's exported backbone to the Hugging Face hub.

    huggingface-cli login          # or HF_TOKEN=...
    python tools/push_to_hub.py runs/cifar10-resnet110_cifar-auglocal OWNER/resnet110_cifar.auglocal_cifar10

Then anyone loads it with timm:
    import timm, timm_local
    model = timm.create_model("hf-hub:OWNER/resnet110_cifar.auglocal_cifar10", pretrained=True)

The export folder (RUN_DIR/export, created by tools/train.py or tools/export.py) is uploaded unchanged
with huggingface_hub, including its README model card. A user error (no export, no login, a refused upload)
is one line on stderr and exit code 2; --debug (or TIMM_LOCAL_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from timm_local.cli import ArgumentParser, command_line_errors, handle_errors, library_errors
from timm_local.export import push_export_to_hub
from timm_local.training import EXPORT_DIR, export_run


def hub_errors() -> list[tuple[type, int]]:
    """The library's errors and the hub's (not logged in, no such repository, refused upload)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    return [(cls, 2) for cls in (*library_errors(), HfHubHTTPError, LocalTokenNotFoundError)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return handle_errors(run, argv, hub_errors())


def run(argv: Optional[Sequence[str]]) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (or an export folder itself)")
    p.add_argument("repo_id", help="OWNER/NAME on the hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="default: the logged-in token / HF_TOKEN")
    p.add_argument("--revision", default=None)
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="only list what would be uploaded")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    export_dir = run_dir if (run_dir / "config.json").is_file() else run_dir / EXPORT_DIR
    if not (export_dir / "model.safetensors").is_file():
        export_dir = export_run(run_dir)
    if args.dry_run:
        for f in sorted(export_dir.iterdir()):
            print(f"would upload {f.name} ({f.stat().st_size} bytes) to {args.repo_id}")
        return 0
    info = push_export_to_hub(export_dir, args.repo_id, private=args.private, token=args.token,
                              revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {export_dir} to {args.repo_id}: {info}")
    print(f"load with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(handle_errors(main, None, [*hub_errors(), *command_line_errors()]))
