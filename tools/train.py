#!/usr/bin/env python
"""Train a timm model with a local learning rule (AugLocal or a baseline) under Accelerate.

    python tools/train.py                                   # resnet20_cifar + AugLocal on scikit-learn digits
    python tools/train.py --config configs/cifar10/resnet110_cifar/auglocal_d3.yaml --data-dir data/
    accelerate launch tools/train.py --model resnet34 --method auglocal --dataset imagenet --data-dir /data/imagenet
    accelerate launch --multi_gpu --num_processes 2 tools/train.py --max-steps 2   # 2 processes; on CPU: gloo
    python tools/train.py --output-dir runs/x --resume auto                    # continue after a stop/kill

Every config key is a flag (see --help); flags override the --config recipe. The loop lives in
timm_local.training.train; this file only parses arguments and reports errors.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from timm_local.config import parse_config
from timm_local.data import DatasetNotFoundError
from timm_local.training import CheckpointMismatchError, NonFiniteLossError, train


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the progress
    try:
        result = train(cfg)
    except (DatasetNotFoundError, CheckpointMismatchError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    best = f"{result.best_top1:.2f}" if result.best_top1 is not None and result.best_top1 >= 0 else "n/a"
    last = f"{result.top1:.2f}" if result.top1 is not None else "n/a"
    print(f"done: top1 {last} (best {best}) after {result.global_step} steps, {result.train_time_s:.1f}s training; "
          f"run folder {result.output_dir}" + (f", export {result.export_dir}" if result.export_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
