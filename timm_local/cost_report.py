"""One model's training cost as one report: MACs and parameters always, step memory and time on request.

Why a module above :mod:`timm_local.cost` and :mod:`timm_local.process_cost`: the report runs both --
the in-process measurements (MACs, live-tensor peak, step time) and the fresh-process one, which itself
measures with cost's live-tensor tracker. The primitives stay below and know nothing of the report.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .cost import macs_per_sample, median_step_time, parameter_counts, peak_step_memory
from .model import LocalModel
from .process_cost import StepCase, process_step_memory

__all__ = ["cost_report"]


def cost_report(
    model: LocalModel,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 64,
    memory: bool = False,
    timing: bool = False,
    case: StepCase | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """MACs and parameters always; peak step memory and median step time on request.

    With ``memory`` and a ``case`` (the recipe ``model`` was built from), the process-level peak of a
    fresh process is measured too (:func:`process_step_memory`). ``progress`` gets a line per phase.
    """
    say = progress or (lambda _: None)
    if input_size is None:
        input_size = tuple(model.backbone.pretrained_cfg["input_size"])
    report: dict[str, Any] = {"input_size": list(input_size)}
    say("counting MACs")
    report.update(macs_per_sample(model, tuple(input_size)))
    report.update(parameter_counts(model))
    if memory or timing:
        device = next(model.parameters()).device
        x = torch.randn(batch_size, *input_size, device=device)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        report["batch_size"] = batch_size
        if memory:
            say(f"live-tensor peak of one step (batch {batch_size})")
            report.update(peak_step_memory(model, x, y))
        if timing:
            say("timing training steps")
            report["step_time_s"] = median_step_time(model, x, y)
        if memory and case is not None:
            say(f"process-level peak: {case.warmup} + {case.steps} SGD steps in a fresh process")
            process = process_step_memory(case, live=False)
            report.update({k: v for k, v in process.items() if k.startswith(("process_", "rss_", "peak_rss"))})
            report["allocator"] = process["allocator"]
    return report
