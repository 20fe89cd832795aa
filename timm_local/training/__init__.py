"""Training: one loop (:mod:`.loop`) over the engine-specific runners (:mod:`.runners`), one module per job.

::

    config -> data -> model -> runner -> loop (set-up) -> trainer + hooks -> export

``builders`` (accelerator, datasets, model, optimizer/schedule), ``runners`` (sequential and pipelined
engines behind one protocol), ``loop`` (:func:`fit`: set-up, the trainer, the export), ``trainer`` (the step
loop and the :class:`Hook` protocol: before_train, before_epoch, before_step, after_backward, after_step,
after_epoch, after_train, on_stop), ``hooks`` (the built-in periodic jobs in their order: non-finite stop,
EMA, metrics window, progress, evaluation, checkpointing, console, preemption; a user's hooks, passed to
:func:`fit`, run after them), ``checkpoint`` (what a checkpoint holds; atomic,
verified save, listing, rotation), ``safe_state`` (state files without pickle), ``restore`` (a checkpoint
into a live run), ``legacy`` (the older pickle format, read safely), ``run_format`` (the run format's versions and the one
:func:`~.run_format.migrate` that brings an older run folder to the current one),
``resume`` (which checkpoint, compatibility, changes, history), ``lock`` (one writer per run folder),
``preempt`` (SIGTERM/SIGUSR1 save and stop), ``finite`` (nothing non-finite stepped or saved), ``metrics``
(metrics.jsonl + trackers), ``evaluate``, ``run`` (reading and exporting finished run folders), ``plot``
(learning curves), ``starting`` (the weights a run starts from), ``targets`` (labels, or smoothed / mixed
class distributions), ``weights`` (the best epoch's backbone, the EMA, what is exported).
"""
from __future__ import annotations

from ..config import TrainConfig
from .builders import build_local_model, eval_batch_size, run_datasets
from .checkpoint import (CHECKPOINT_DIR, META_NAME, TMP_PREFIX, CheckpointError, latest_checkpoint, list_checkpoints,
                         newest_verified, read_checkpoint_meta, verify_checkpoint)
from .evaluate import evaluate
from .finite import NonFiniteLossError
from .loop import fit
from .metrics import METRICS_NAME, read_metrics
from .run import CONFIG_NAME, EXPORT_DIR, SavedRun, export_run, load_local_model, read_run
from .resume import CheckpointMismatchError
from .runners import RUNNERS, PipelineRunner, Runner, SequentialRunner, make_runner, pipeline_layout
from .state import TrainResult, TrainState
from .trainer import Hook

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_NAME", "CheckpointError", "CheckpointMismatchError", "EXPORT_DIR", "Hook", "META_NAME",
    "METRICS_NAME", "NonFiniteLossError", "PipelineRunner", "RUNNERS", "Runner", "SavedRun", "SequentialRunner",
    "TMP_PREFIX",
    "TrainResult", "TrainState", "build_local_model", "eval_batch_size", "evaluate", "export_run", "fit",
    "latest_checkpoint", "list_checkpoints", "load_local_model", "make_runner", "newest_verified", "pipeline_layout",
    "read_checkpoint_meta", "read_metrics", "read_run", "run_datasets", "train", "verify_checkpoint",
]


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg`` (single process, or every process of a launch) on the engine ``cfg.engine`` names."""
    return fit(cfg)
