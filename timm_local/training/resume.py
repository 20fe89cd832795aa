"""Resume means "continue this run": which checkpoint, whether it may be continued, what changed, the history.

* **Which checkpoint.** ``--resume auto`` takes the newest checkpoint of the run folder that verifies
  (:func:`~timm_local.training.checkpoint.verify_checkpoint`), warning about each newer one it skips;
  ``--resume PATH`` takes that checkpoint (or the newest of that run folder) and names the bad file if it
  does not verify. Nothing is overwritten without a resume: the guard covers every output of a run.
* **Whether.** Weights of another model, method or class count are refused, as are changes the checkpoint's
  optimizer state or data order cannot follow (:data:`~timm_local.config.FIXED_ON_RESUME`).
* **What changed** is applied, never only recorded: a changed schedule key restarts the schedule at the
  current step (:func:`~timm_local.training.builders.restart_schedule`); the rest (evaluation, logging,
  checkpoint cadence, data loading, engine) simply takes effect. ``config.yaml`` keeps the history.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from ..config import CONFIG_NAME, FIXED_ON_RESUME, TrainConfig, config_changes, is_resuming
from ..errors import UserError
from .checkpoint import (CHECKPOINT_DIR, CHECKPOINT_PREFIX, META_NAME, CheckpointError, UnsafePickleError,
                         checkpoint_folders, checkpoint_step, newest_verified, read_checkpoint_meta, remove_checkpoint,
                         verify_checkpoint)
from .metrics import METRICS_NAME
from .restore import restore_checkpoint
from .run import EXPORT_DIR
from .run_format import current_meta, read_run_config
from .state import TrainState

__all__ = ["CheckpointMismatchError", "RUN_OUTPUTS", "check_compatible", "discard_newer_checkpoints",
           "resolve_resume", "resume_state", "run_history", "run_meta", "run_outputs"]

logger = logging.getLogger(__name__)

#: Everything a run writes into its folder (the overwrite guard looks at all of it).
RUN_OUTPUTS = (CONFIG_NAME, METRICS_NAME, EXPORT_DIR, CHECKPOINT_DIR, "logs")


class CheckpointMismatchError(UserError, ValueError):
    """Refusal to resume from a checkpoint of a different run, or with a change it cannot follow."""


def run_outputs(output_dir: Path) -> list[str]:
    """The outputs of an earlier run present in ``output_dir`` (empty folders do not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def _is_finished(output_dir: Path) -> bool:
    metrics = output_dir / METRICS_NAME
    return (output_dir / EXPORT_DIR).is_dir() or (metrics.is_file() and '"kind": "summary"' in metrics.read_text())


def _newest(run_dir: Path, trust_pickle: bool) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that verifies; a warning names each newer one skipped."""
    found, skipped = newest_verified(run_dir, trust_pickle)
    if found is None and skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"no checkpoint of {run_dir} verifies ({reasons}); start the run again in another "
                              f"--output-dir")
    for folder, why in skipped:
        logger.warning("skipping checkpoint %s: %s; resuming from %s, the newest one that verifies", folder, why,
                       found.name)
    return found


def _previous_verified(path: Path, trust_pickle: bool) -> Optional[Path]:
    """The newest checkpoint older than ``path`` in its run folder that verifies."""
    if not path.name[len(CHECKPOINT_PREFIX):].isdigit():
        return None
    for folder in reversed(checkpoint_folders(path.parent.parent)):
        if checkpoint_step(folder) < checkpoint_step(path):
            try:
                verify_checkpoint(folder, trust_pickle)
                return folder
            except (FileNotFoundError, CheckpointError):
                continue
    return None


def _verified(path: Path, trust_pickle: bool) -> Path:
    """``path`` if it verifies, else an error naming the bad file and the checkpoint to use instead."""
    try:
        verify_checkpoint(path, trust_pickle)
    except UnsafePickleError:
        raise
    except (FileNotFoundError, CheckpointError) as e:
        good = _previous_verified(path, trust_pickle)
        hint = f"; the previous checkpoint {good} verifies: resume from it with --resume {good}" if good else ""
        raise CheckpointError(f"cannot resume from {path}: {e}{hint}") from None
    return path


def resolve_resume(cfg: TrainConfig, output_dir: Path) -> Optional[Path]:
    """The checkpoint ``cfg.resume`` asks for (None: start fresh), refusing to overwrite an earlier run."""
    outputs = run_outputs(output_dir)
    if not is_resuming(cfg.resume):
        if outputs:
            raise FileExistsError(
                f"{output_dir} already holds the outputs of an earlier run ({', '.join(outputs)}). Pass --resume auto "
                f"to continue it, or choose another --output-dir.")
        return None
    if cfg.resume == "auto":
        found = _newest(output_dir, cfg.trust_pickle)
        if found is None and _is_finished(output_dir):
            raise FileExistsError(
                f"{output_dir} holds a finished run ({', '.join(outputs)}) but no checkpoint to continue from; choose "
                f"another --output-dir (or delete those outputs to train again here)")
        if found is None and outputs:
            logger.warning("%s has no checkpoint yet (the earlier run stopped before its first one): starting the "
                           "run from the beginning", output_dir)
        return found
    path = Path(cfg.resume)
    if (path / META_NAME).is_file() or (path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)):
        found = _verified(path, cfg.trust_pickle)
    elif checkpoint_folders(path):  # a run folder was given
        found = _newest(path, cfg.trust_pickle)
    else:
        raise CheckpointError(f"--resume {cfg.resume}: not a checkpoint folder (no {META_NAME}) and not a run folder "
                              f"with checkpoints")
    if outputs and found.resolve().parent != (output_dir / CHECKPOINT_DIR).resolve():
        raise FileExistsError(
            f"{output_dir} already holds the outputs of another run ({', '.join(outputs)}); resume {found} into an "
            f"empty --output-dir, or pass --resume auto to continue the run in {output_dir}")
    return found


def run_meta(cfg: TrainConfig, lm: Any, data: Any, world: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (checked by :func:`check_compatible`), and the
    configuration it was trained with (what a resume compares its own with)."""
    return {
        "model": cfg.model, "method": lm.method_name, "method_config": lm.method_config,
        "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size,
        "num_processes": world, "config": cfg.to_dict(),
    }


def _refusal(checkpoint: Path, what: str, differences: list[tuple[str, Any, Any]], advice: str
             ) -> CheckpointMismatchError:
    details = "; ".join(f"{k}: checkpoint has {was!r}, this run has {now!r}" for k, was, now in differences)
    return CheckpointMismatchError(f"Refusing to resume from {checkpoint}{what} ({details}). {advice}")


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], checkpoint: Path) -> None:
    """Refuse checkpoints whose weights belong to another model/method/classifier."""
    expected = json.loads(json.dumps(expected))  # compare as stored (tuples -> lists)
    wrong = [(k, meta[k], expected[k]) for k in ("model", "method", "method_config", "num_classes", "in_chans")
             if k in meta and meta[k] != expected[k]]
    if wrong:
        raise _refusal(checkpoint, ": it was written by a different run", wrong,
                       "Resume with the same --model/--method/--aux-depth/--tau/--num-classes, or start a new run "
                       "in another --output-dir.")
    if meta.get("num_processes", expected["num_processes"]) != expected["num_processes"]:
        logger.warning("resuming with %d processes a checkpoint written by %d (same global batch; the RNG states of "
                       "processes the checkpoint lacks start fresh)", expected["num_processes"], meta["num_processes"])


def resume_changes(meta: dict[str, Any], cfg: TrainConfig, checkpoint: Path) -> dict[str, dict[str, Any]]:
    """What ``cfg`` changes of the configuration the checkpoint was trained with; refuses what cannot change."""
    changes = config_changes(current_meta(meta)["config"], cfg)
    refused = [k for k in FIXED_ON_RESUME if k in changes]
    precision = changes.get("mixed_precision")
    if precision and "fp16" in (precision["was"], precision["now"]):
        refused.append("mixed_precision")  # the grad scaler's state exists only in fp16 checkpoints
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in refused)
        raise _refusal(checkpoint, f" with a changed {flags}",
                       [(k, changes[k]["was"], changes[k]["now"]) for k in refused],
                       "The checkpoint's optimizer state and data order belong to the old value: resume with the "
                       "value it was trained with (drop the flag), or start a new run in another --output-dir.")
    done = int(meta.get("train_state", {}).get("epoch", 0))
    if cfg.epochs < done:
        raise CheckpointMismatchError(f"Refusing to resume from {checkpoint}: it has trained {done} epochs already, "
                                      f"more than --epochs {cfg.epochs}")
    return changes


def resume_state(accelerator: Any, checkpoint: Path, meta: dict[str, Any], cfg: TrainConfig, state: TrainState,
                 steps_per_epoch: int) -> dict[str, dict[str, Any]]:
    """Refuse an incompatible checkpoint or change, then restore model, optimizer, schedule, RNG and position.

    Returns the changes of ``cfg`` against the checkpoint's configuration (schedule keys: the caller restarts
    the schedule).
    """
    saved = read_checkpoint_meta(checkpoint)
    check_compatible(saved, meta, checkpoint)
    changes = resume_changes(saved, cfg, checkpoint)
    try:
        restore_checkpoint(accelerator, checkpoint, state, cfg.trust_pickle)
    except CheckpointError:
        raise
    except Exception as e:  # verified files that still do not load: name the checkpoint and what failed
        raise CheckpointError(f"cannot load {checkpoint} ({type(e).__name__}: {e})") from e
    if state.step_in_epoch >= steps_per_epoch:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    for key, change in changes.items():
        logger.warning("resuming with %s=%r (the checkpoint was trained with %r)", key, change["now"], change["was"])
    logger.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch, state.global_step)
    return changes


def discard_newer_checkpoints(output_dir: Path, resume_from: Optional[Path]) -> None:
    """Checkpoints newer than the one resumed belong to the continuation being replaced (or failed to verify):
    remove them, so a later ``--resume auto`` cannot pick them up."""
    if resume_from is None or resume_from.resolve().parent != (output_dir / CHECKPOINT_DIR).resolve():
        return
    for folder in checkpoint_folders(output_dir):
        if checkpoint_step(folder) > checkpoint_step(resume_from):
            logger.warning("removing %s: it is newer than the checkpoint resumed (%s)", folder, resume_from.name)
            remove_checkpoint(folder)


def run_history(output_dir: Path, cfg: TrainConfig, resume_from: Optional[Path], step: int,
                changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``config.yaml``'s ``history``: how the run started, then each resume with the step and what it changed."""
    start = {"event": "start", "step": 0, "config": cfg.to_dict()}
    if resume_from is None:
        return [start]
    previous = [{"event": "start", "step": 0, "config": None}]  # a checkpoint whose run folder lost its config
    for path in (output_dir / CONFIG_NAME, resume_from.parent.parent / CONFIG_NAME):
        if path.is_file():
            previous = read_run_config(path)["history"]
            break
    return previous + [{"event": "resume", "step": step, "checkpoint": resume_from.name, "changed": changes}]
