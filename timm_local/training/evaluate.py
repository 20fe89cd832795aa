"""Evaluation of a LocalModel on a test loader: the backbone alone (top-1, top-5, loss), its EMA beside it,
and each auxiliary head as a diagnostic."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["evaluate"]

#: The per-sample columns of one model: top-1 hit, top-5 hit, loss.
MODEL_COLUMNS = ("top1", "top5", "loss")


def _per_sample(logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample top-1 and top-5 hits and loss (top-k: k = min(5, classes)).

    Why not ``timm.utils.accuracy``: it returns a batch's percentage, and ``gather_for_metrics`` needs
    per-sample values to drop the samples the last batch repeats across processes.
    """
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return [(logits.argmax(dim=1) == y).float(), (top == y[:, None]).any(dim=1).float(),
            F.cross_entropy(logits.float(), y, reduction="none")]


@torch.no_grad()
def evaluate(lm: Any, loader: Any, accelerator: Any, heads: bool = True, ema: Optional[Any] = None
             ) -> dict[str, Any]:
    """Top-1, top-5 and loss of the backbone alone on ``loader``, the same of ``ema`` (a backbone, keys
    ``ema_*``), and per-auxiliary-head top-1 as a diagnostic.

    The per-head pass reuses ``local_step`` with a no-op backward under ``no_grad``, so the heads see
    exactly the features they see in training (eval-mode BatchNorm).
    """
    was_training = lm.training
    lm.eval()
    sums: Optional[torch.Tensor] = None
    total = 0
    for x, y in loader:
        with accelerator.autocast():
            logits = lm(x)
            ema_logits = ema(x) if ema is not None else None
        columns = _per_sample(logits, y)
        if ema_logits is not None:
            columns += _per_sample(ema_logits, y)
        if heads and len(lm.heads) > 0:
            with accelerator.autocast():
                out = lm.local_step(x, y, backward=lambda loss: None)
            columns += [(h.argmax(dim=1) == y).float() for h in out.head_logits if h is not None]
        table = accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        total += table.shape[0]
        batch = table.double().sum(dim=0)
        sums = batch if sums is None else sums + batch
    lm.train(was_training)
    assert sums is not None, "the test loader is empty"
    means = (sums / max(total, 1)).tolist()
    n = len(MODEL_COLUMNS)
    result: dict[str, Any] = {k: (v if k == "loss" else 100.0 * v) for k, v in zip(MODEL_COLUMNS, means[:n])}
    result["samples"] = total
    if ema is not None:
        result.update({f"ema_{k}": (v if k == "loss" else 100.0 * v) for k, v in zip(MODEL_COLUMNS, means[n:2 * n])})
    head = means[2 * n if ema is not None else n:]
    if head:
        result["head_top1"] = [round(100.0 * c, 3) for c in head]
    return result
