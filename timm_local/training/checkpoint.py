"""Checkpoints of a run: atomic save, listing, compatibility, resume.

A checkpoint is ``accelerator.save_state`` (optimizer, grad scaler, samplers, every process's RNG
states) plus the objects registered here in :data:`CUSTOM_OBJECTS` order (the LocalModel with its
auxiliary heads, the timm scheduler, the loop position), and ``checkpoint_meta.json`` saying which run
wrote it. It is written into a temporary folder and renamed into place (hand-written because
Accelerate writes in place: a kill mid-save would leave a half checkpoint that looks complete), so a
kill at any moment leaves the previous complete checkpoint loadable.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from ..config import TrainConfig
from ..data import DataConfig
from .state import TrainState

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_PREFIX", "CUSTOM_OBJECTS", "CheckpointMismatchError", "META_NAME",
           "SchedulerState", "TMP_PREFIX", "check_compatible", "latest_checkpoint", "list_checkpoints",
           "load_model_state", "read_checkpoint_meta", "register_for_checkpointing", "resolve_resume",
           "resume_state", "run_meta", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META_NAME = "checkpoint_meta.json"
#: The order of ``accelerator.register_for_checkpointing``: object i is saved as Accelerate's custom state i.
CUSTOM_OBJECTS = ("model", "scheduler", "train_state")


class CheckpointMismatchError(ValueError):
    """Refusal to resume from a checkpoint of a different model, method or classifier."""


class SchedulerState:
    """Adapter giving a timm scheduler (or None) the state_dict protocol Accelerate checkpoints."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def register_for_checkpointing(accelerator: Any, model: Any, scheduler: Any, state: TrainState) -> None:
    """Register the run's own objects with ``save_state``/``load_state``, in :data:`CUSTOM_OBJECTS` order."""
    accelerator.register_for_checkpointing(model, SchedulerState(scheduler), state)


def list_checkpoints(output_dir: Union[str, Path]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / META_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_checkpoint_meta(checkpoint: Union[str, Path]) -> dict[str, Any]:
    """The ``checkpoint_meta.json`` of a checkpoint: which run wrote it, and its loop position."""
    path = Path(checkpoint) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete timm_local checkpoint (no {META_NAME})")
    return json.loads(path.read_text())


class _StateHolder:
    """Receives a state dict from :func:`accelerate.checkpointing.load_custom_state`."""

    state: dict[str, Any]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def load_model_state(checkpoint: Union[str, Path]) -> dict[str, Any]:
    """The LocalModel state dict (``backbone.*`` and the auxiliary heads) of a checkpoint, on the CPU."""
    from accelerate import PartialState
    from accelerate.checkpointing import load_custom_state

    PartialState()  # accelerate's loader logs through its state; outside a run this is a plain single process
    meta = read_checkpoint_meta(checkpoint)
    holder = _StateHolder()
    load_custom_state(holder, str(checkpoint), index=meta.get("custom_objects", list(CUSTOM_OBJECTS)).index("model"))
    return holder.state


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, meta: dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename to ``step_XXXXXXXX``."""
    root = output_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a killed save
    accelerator.wait_for_everyone()
    if final.exists():  # the same step was saved already (e.g. the epoch end coincides with a step save)
        return final
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META_NAME).write_text(json.dumps({**meta, "train_state": state.state_dict()}, indent=2))
        _fsync_tree(tmp)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint exists completely or not at all
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def run_meta(cfg: TrainConfig, lm: Any, data: DataConfig, world: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (checked by :func:`check_compatible`)."""
    return {
        "model": cfg.model, "method": lm.method_name, "method_config": lm.method_config,
        "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size,
        "dataset": data.dataset, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "lr": cfg.lr,
        "num_processes": world, "custom_objects": list(CUSTOM_OBJECTS),
    }


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], checkpoint: Path) -> None:
    """Refuse checkpoints whose weights belong to another model/method; warn on recipe changes."""
    expected = json.loads(json.dumps(expected))  # compare as stored (tuples -> lists)
    wrong = [k for k in ("model", "method", "method_config", "num_classes", "in_chans")
             if k in meta and meta[k] != expected[k]]
    if wrong:
        details = "; ".join(f"{k}: checkpoint has {meta[k]!r}, this run has {expected[k]!r}" for k in wrong)
        raise CheckpointMismatchError(
            f"Refusing to resume from {checkpoint}: it was written by a different run ({details}). "
            f"Resume with the same --model/--method/--aux-depth/--tau/--num-classes, or start a new run in "
            f"another --output-dir.")
    for k in ("dataset", "batch_size", "epochs", "lr", "num_processes"):
        if k in meta and k in expected and meta[k] != expected[k]:
            logger.warning("Resuming with %s=%r although the checkpoint was trained with %r", k, expected[k], meta[k])


def resolve_resume(cfg: TrainConfig, output_dir: Path) -> Optional[Path]:
    """The checkpoint ``cfg.resume`` asks for (None: start fresh), refusing to overwrite an earlier run."""
    if cfg.resume in (None, "", "none", "no"):
        existing = latest_checkpoint(output_dir)
        if existing is not None:
            raise FileExistsError(
                f"{output_dir} already holds checkpoints of an earlier run (latest: {existing.name}). Pass "
                f"--resume auto to continue it, or choose another --output-dir.")
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(output_dir)  # None: nothing to resume, start fresh
    path = Path(cfg.resume)
    if path.is_dir() and not (path / META_NAME).is_file() and latest_checkpoint(path) is not None:
        return latest_checkpoint(path)  # a run folder was given
    if not (path / META_NAME).is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: not a complete checkpoint folder (no {META_NAME}) and not "
                                f"a run folder with checkpoints")
    return path


def resume_state(accelerator: Any, checkpoint: Path, meta: dict[str, Any], state: TrainState,
                 steps_per_epoch: int) -> None:
    """Refuse an incompatible checkpoint, then restore model, optimizer, schedule, RNG and position."""
    check_compatible(read_checkpoint_meta(checkpoint), meta, checkpoint)
    accelerator.load_state(str(checkpoint))
    if state.step_in_epoch >= steps_per_epoch:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    logger.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch, state.global_step)
