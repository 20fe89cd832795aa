"""What a person watching a run reads on the console: the run's choices at start, one line per epoch.

Why a module of its own: the loop writes metrics for programs (metrics.jsonl, trackers); these lines are
for the person at the terminal, who should learn from them which dataset, d and tau the run really uses
(defaults included: the headline command trains on the bundled digits unless told otherwise) and how
far it got, without reading a file. Lines go through ``tqdm.write`` so they never collide with the
progress bar; the loop also routes logging through tqdm (``tqdm.contrib.logging.logging_redirect_tqdm``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import TrainConfig
from ..memory import allocator_name, cuda_alloc_conf

__all__ = ["epoch_line", "memory_route_line", "start_line"]


def start_line(cfg: TrainConfig, data: Any, lm: Any, output_dir: Path, world: int, default_dataset: bool) -> str:
    """One line: model, method with its settings, the data (and whether it is the default; what decided its input
    size), processes, folder."""
    settings = ", ".join(f"{k}={v}" for k, v in lm.method_config.items() if k in ("aux_depth", "tau"))
    dataset = (f"{data.dataset} (the default; --dataset chooses yours)" if default_dataset else data.dataset)
    size_source = f" (size from {data.size_source})" if getattr(data, "size_source", "") else ""
    return (f"training {cfg.model} with {lm.method_name}{f' ({settings})' if settings else ''} on {dataset}: "
            f"{data.train_size} train / {data.test_size} test images, {data.num_classes} classes, "
            f"{data.in_chans}x{data.image_size}x{data.image_size}{size_source}; "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} "
            f"of batch {cfg.batch_size}"
            f"{f' ({cfg.grad_accum_steps} accumulated micro-batches)' if (cfg.grad_accum_steps or 1) > 1 else ''} "
            f"on {world} process{'es' if world > 1 else ''}, mixed precision {cfg.mixed_precision}; "
            f"run folder {output_dir}")


def memory_route_line(device: Any) -> str:
    """Which allocator holds the run's memory, and on the CPU whether it keeps local learning's saving."""
    if getattr(device, "type", str(device)) == "cuda":
        return f"CUDA caching allocator: {cuda_alloc_conf() or 'default settings'}"
    allocator = allocator_name()
    hint = ("" if allocator != "glibc" else " (its caching hides most of the activation memory local learning "
            "frees; launch with `python -m torch.backends.xeon.run_cpu --enable-tcmalloc tools/train.py ...`, "
            "docs/memory.md)")
    return f"host memory allocator: {allocator}{hint}"


def epoch_line(epoch: int, epochs: int, train_loss: Optional[float], eval_row: Optional[Mapping[str, Any]],
               seconds: float, output_dir: Path, partial: bool = False) -> str:
    """One line per epoch (``partial``: stopped inside it by --max-steps): its loss, the test top-1 (when
    evaluated) and where the run is."""
    loss = f"train loss {train_loss:.4f}" if train_loss is not None else "train loss n/a"
    if eval_row is not None:
        top1 = f"test top-1 {eval_row['top1']:.2f}% (best {eval_row['best_top1']:.2f}%)"
        top1 += f", top-5 {eval_row['top5']:.2f}%" if "top5" in eval_row else ""
        top1 += f", EMA top-1 {eval_row['ema_top1']:.2f}%" if "ema_top1" in eval_row else ""
    else:
        top1 = "not evaluated (--eval-every)"
    stopped = " (stopped inside it: --max-steps)" if partial else ""
    return f"epoch {epoch}/{epochs}{stopped}: {loss}, {top1}, {seconds:.1f}s; run folder {output_dir}"
