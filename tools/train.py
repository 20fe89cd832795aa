#!/usr/bin/env python
"""Train a timm model with a local learning rule (AugLocal or a baseline) under Accelerate.

    python tools/train.py                                   # resnet20_cifar + AugLocal on scikit-learn digits
    python tools/train.py --config configs/cifar10/resnet110_cifar/auglocal_d3.yaml --data-dir data/
    accelerate launch tools/train.py --model resnet34 --method auglocal --dataset imagenet --data-dir /data/imagenet
    accelerate launch --multi_gpu --num_processes 2 tools/train.py --max-steps 2   # 2 processes; on CPU: gloo
    python tools/train.py --output-dir runs/x --resume auto                    # continue after a stop/kill

Every config key is a flag (see --help); flags override the --config recipe, and a resume without --config
continues from the run folder's own config.yaml. The loop lives in timm_local.training.train; this file only
parses arguments and reports errors: a user error is one line on stderr and exit code 2 (3: the run stopped
on a non-finite loss or step; 75: preempted by a signal after saving a checkpoint); --debug (or TIMM_LOCAL_DEBUG=1) shows the traceback.

Memory (docs/memory.md): on CUDA, PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True unless
you set it (or PYTORCH_ALLOC_CONF); on the CPU, launch through PyTorch's CPU launcher with tcmalloc, as
`make run` does, or glibc's malloc keeps most of local learning's activation saving:

    python -m torch.backends.xeon.run_cpu --enable-tcmalloc tools/train.py --config ...
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from timm_local.cli import command_line_errors, handle_errors, library_errors, parse_config
from timm_local.memory import default_cuda_alloc_conf
from timm_local.training import NonFiniteLossError, train
from timm_local.training.preempt import PREEMPTED_EXIT, Preempted


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The tool; called in-process (tests) it reports the library's errors with their exit code too."""
    return handle_errors(run, argv, [(NonFiniteLossError, 3), *((cls, 2) for cls in library_errors())])


def run(argv: Optional[Sequence[str]]) -> int:
    default_cuda_alloc_conf()  # before the first CUDA allocation; the run's start lines say the route
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the progress
    cfg = parse_config(argv, description=__doc__)
    try:
        result = train(cfg)
    except Preempted as e:  # not an error: the run saved and asks to be continued
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    best = f"{result.best_top1:.2f}" if result.best_top1 is not None and result.best_top1 >= 0 else "n/a"
    last = f"{result.top1:.2f}" if result.top1 is not None else "n/a"
    print(f"done: top1 {last} (best {best}) after {result.global_step} steps, {result.train_time_s:.1f}s training; "
          f"run folder {result.output_dir}" + (f", export {result.export_dir}" if result.export_dir else ""))
    return 0


def exit_without_teardown_on_failure(entry: Callable[[], int]) -> int:
    """``entry()``; if it raises inside a multi-process launch, print the traceback and leave at once.

    Why: after a collective timed out (a hung or lost node), the interpreter's normal shutdown destroys
    the process groups, and gloo's teardown may wait on the peer that is gone -- the process that reported
    the error would then never exit and its launcher never learn of it. Checkpoints are written atomically,
    so leaving without teardown loses nothing that was saved.
    """
    from timm_local.distributed import is_distributed

    try:
        return entry()
    except BaseException:
        if not is_distributed():
            raise
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(exit_without_teardown_on_failure(lambda: handle_errors(main, None, command_line_errors())))
