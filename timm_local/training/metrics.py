"""A run's metrics: ``metrics.jsonl`` (one JSON object per line, for people and plots) and the trackers.

Rows have a ``kind``: ``train`` (every ``--log-every`` steps), ``eval``, ``error`` and a final
``summary``. Training rows are aggregated over a logging window from per-stage sums
(:func:`timm_local.engine.stage_sums`) with one all-reduce, so every engine logs the same numbers.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["METRICS_NAME", "MetricsLog", "TrainWindow", "WINDOW_KEYS", "read_metrics", "scalar_config",
           "tracker_names", "train_row"]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
#: The per-stage sums a training window accumulates, in the order they are all-reduced.
WINDOW_KEYS = ("loss_sum", "samples", "correct", "scored")


def _rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a ``metrics.jsonl``, and whether its last line was cut short (a crash or a full disk in
    the middle of an append): that line is left out. A bad line anywhere else is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        last = [json.loads(lines[-1])] if lines else []
        truncated = False
    except json.JSONDecodeError:
        last, truncated = [], True
    return [json.loads(line) for line in lines[:-1]] + last, truncated


def read_metrics(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``kind`` = train | eval | error | summary); a last line cut
    short by a crash is skipped (a resume removes it)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_NAME} in {run_dir}")
    return _rows(path)[0]


def tracker_names(spec: Optional[str]) -> list[str]:
    """``--trackers``: ``auto`` = TensorBoard when installed, ``none``, or a comma-separated list."""
    if spec in ("none", "", None):
        return []
    if spec == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else []
    return [s.strip() for s in spec.split(",") if s.strip()]


def scalar_config(d: dict[str, Any]) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) accept scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


class MetricsLog:
    """Append-only ``metrics.jsonl`` (main process) mirrored to the Accelerate trackers.

    On resume the file is cut back to the checkpoint's step: rows written after it belong to work
    that is being redone.
    """

    def __init__(self, accelerator: Any, path: Path, resume_step: Optional[int]) -> None:
        self.accelerator = accelerator
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if accelerator.is_main_process and path.exists():
            rows, truncated = _rows(path)
            if truncated:
                logger.warning("%s: removing its last line, truncated by the end of the previous run", path)
            if resume_step is not None:
                rows = [r for r in rows if r.get("step", 0) <= resume_step and r.get("kind") != "summary"]
            else:
                rows = []
            self.rows = rows
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict[str, Any], write: Optional[bool] = None) -> None:
        """Append ``row`` (written by the main process, or where ``write`` says: an error only one process
        knows of) and send its numbers to the trackers."""
        row = {k: v for k, v in row.items() if v is not None}
        if self.accelerator.is_main_process if write is None else write:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        scalars: dict[str, float] = {}
        kind = row.get("kind", "train")
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                scalars[f"{kind}/{k}"] = float(v)
            elif isinstance(v, list):
                for i, vi in enumerate(v):
                    if isinstance(vi, (int, float)):
                        scalars[f"{kind}/{k}_{i}"] = float(vi)
        if scalars:
            self.accelerator.log(scalars, step=int(row.get("step", 0)))


def train_row(window: torch.Tensor, epoch: int, step: int, lr: float, elapsed: float) -> dict[str, Any]:
    """A ``train`` row from a window's per-stage sums, summed over processes (rows of :data:`WINDOW_KEYS`).

    ``loss`` is the network output's loss (the last stage), ``local_losses`` every stage's,
    ``head_train_top1`` the running training accuracy of every auxiliary head that returns logits.
    """
    loss_sum, samples, correct, scored = window.view(len(WINDOW_KEYS), -1)
    losses = (loss_sum / samples.clamp(min=1)).tolist()
    acc = [100.0 * float(c) / float(s) for c, s in zip(correct, scored) if s > 0]
    return {"kind": "train", "epoch": epoch, "step": step, "lr": lr, "loss": losses[-1],
            "local_losses": [round(v, 5) for v in losses], "train_top1": acc[-1],
            "head_train_top1": [round(a, 3) for a in acc[:-1]],
            "samples_per_s": float(samples[-1]) / max(elapsed, 1e-9)}


class TrainWindow:
    """The per-stage sums (:data:`WINDOW_KEYS`) since the last ``train`` row.

    Checkpointed (:meth:`state` into the loop position; a resume restores it,
    :func:`~timm_local.training.resume.restore_window`), so a run resumed between two rows logs the rows an
    uninterrupted run logs.
    """

    def __init__(self) -> None:
        self.sums: Optional[dict[str, torch.Tensor]] = None
        self.t0 = time.perf_counter()

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums = sums if self.sums is None else {k: self.sums[k] + v for k, v in sums.items()}

    def _totals(self, accelerator: Any) -> torch.Tensor:
        return accelerator.reduce(torch.cat([self.sums[k] for k in WINDOW_KEYS]), reduction="sum")

    def row(self, accelerator: Any, epoch: int, step: int, lr: float) -> dict[str, Any]:
        """The ``train`` row of the window (one all-reduce), which starts a new window."""
        row = train_row(self._totals(accelerator), epoch, step, lr, time.perf_counter() - self.t0)
        self.sums, self.t0 = None, time.perf_counter()
        return row

    def state(self, accelerator: Any) -> Optional[list[float]]:
        """The totals so far, for the checkpoint (a collective: every process calls it)."""
        return None if self.sums is None else self._totals(accelerator).tolist()
