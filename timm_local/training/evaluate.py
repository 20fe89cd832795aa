"""Evaluation of a LocalModel on a test loader: the backbone alone, and each auxiliary head as a diagnostic."""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(lm: Any, loader: Any, accelerator: Any, heads: bool = True) -> dict[str, Any]:
    """Top-1 of the backbone alone on ``loader`` (+ per-auxiliary-head top-1 as a diagnostic).

    The per-head pass reuses ``local_step`` with a no-op backward under ``no_grad``, so the heads see
    exactly the features they see in training (eval-mode BatchNorm).
    """
    was_training = lm.training
    lm.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    head_correct: Optional[torch.Tensor] = None
    total = 0
    loss_sum = 0.0
    for x, y in loader:
        with accelerator.autocast():
            logits = lm(x)
        hits = (logits.argmax(dim=1) == y)
        losses = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        columns = [hits.float(), losses]
        if heads and len(lm.heads) > 0:
            with accelerator.autocast():
                out = lm.local_step(x, y, backward=lambda loss: None)
            columns += [(h.argmax(dim=1) == y).float() for h in out.head_logits if h is not None]
        table = accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        total += table.shape[0]
        correct += table[:, 0].sum().double()
        loss_sum += float(table[:, 1].sum())
        if table.shape[1] > 2:
            h = table[:, 2:].sum(dim=0).double()
            head_correct = h if head_correct is None else head_correct + h
    lm.train(was_training)
    result: dict[str, Any] = {"top1": 100.0 * float(correct) / max(total, 1), "loss": loss_sum / max(total, 1),
                              "samples": total}
    if head_correct is not None:
        result["head_top1"] = [round(100.0 * float(c) / total, 3) for c in head_correct]
    return result
