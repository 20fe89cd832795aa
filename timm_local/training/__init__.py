"""Training: one loop (:mod:`.loop`) over the engine-specific runners (:mod:`.runners`), one module per job.

::

    config -> data -> model -> runner -> loop -> checkpoint / metrics / export

``builders`` (accelerator, datasets, model, optimizer/schedule), ``runners`` (sequential and pipelined
engines behind one protocol), ``loop`` (:func:`fit`), ``checkpoint`` (atomic save, listing, resume,
compatibility), ``metrics`` (metrics.jsonl + trackers), ``evaluate``, ``run`` (reading and exporting
finished run folders), ``plot`` (learning curves).
"""
from __future__ import annotations

from ..config import TrainConfig
from .builders import build_local_model, eval_batch_size, run_datasets
from .checkpoint import (CHECKPOINT_DIR, META_NAME, TMP_PREFIX, CheckpointMismatchError, latest_checkpoint,
                         list_checkpoints, read_checkpoint_meta)
from .evaluate import evaluate
from .loop import NonFiniteLossError, fit
from .metrics import METRICS_NAME, read_metrics
from .run import CONFIG_NAME, EXPORT_DIR, SavedRun, export_run, load_local_model, read_run
from .runners import RUNNERS, PipelineRunner, Runner, SequentialRunner, make_runner, pipeline_layout
from .state import TrainResult, TrainState

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_NAME", "CheckpointMismatchError", "EXPORT_DIR", "META_NAME", "METRICS_NAME",
    "NonFiniteLossError", "PipelineRunner", "RUNNERS", "Runner", "SavedRun", "SequentialRunner", "TMP_PREFIX",
    "TrainResult", "TrainState", "build_local_model", "eval_batch_size", "evaluate", "export_run", "fit",
    "latest_checkpoint", "list_checkpoints", "load_local_model", "make_runner", "pipeline_layout",
    "read_checkpoint_meta", "read_metrics", "read_run", "run_datasets", "train",
]


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg`` (single process, or every process of a launch) on the engine ``cfg.engine`` names."""
    return fit(cfg, make_runner(cfg))
