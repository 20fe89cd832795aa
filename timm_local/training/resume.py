"""Resume means "continue this run": the one module that says which checkpoint, what may change, and how the
run continues -- the loop only calls it (:func:`resolve_resume` before set-up, :func:`resume_run` once the
objects exist, :func:`continue_in` and :func:`run_history` when the folder is written, :func:`restore_window`
for the metrics window).

* **Which checkpoint.** ``--resume auto`` takes the newest checkpoint of the run folder that verifies
  (:func:`~timm_local.training.checkpoint.verify_checkpoint`), warning about each newer one it skips;
  ``--resume PATH`` takes that checkpoint (or the newest of that run folder) and names the bad file if it
  does not verify. Nothing is overwritten without a resume: the guard covers every output of a run.
* **What may change.** Weights of another model, method or class count are refused, as are changes the
  checkpoint's optimizer state or data order cannot follow (:data:`~timm_local.config.FIXED_ON_RESUME`).
  The checkpoint's configuration is read in the current run format (:mod:`.run_format`), so an older
  checkpoint is compared like a new one.
* **What changed** is applied, never only recorded: a changed schedule key restarts the schedule at the
  current step (:func:`restart_schedule`); the rest (evaluation, logging, checkpoint cadence, data loading,
  engine) simply takes effect.
* **The run's own record.** Checkpoints newer than the one resumed, and a best-epoch file written after it,
  belong to the continuation being replaced and are removed; the folder is migrated to the current run
  format once; ``config.yaml`` keeps the history; the train-metric window continues where it stopped.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import CONFIG_NAME, FIXED_ON_RESUME, SCHEDULE_KEYS, TrainConfig, config_changes, is_resuming
from ..errors import UserError
from .checkpoint import (CHECKPOINT_DIR, CHECKPOINT_PREFIX, META_NAME, CheckpointError, UnsafePickleError,
                         checkpoint_folders, checkpoint_step, newest_verified, read_checkpoint_meta, remove_checkpoint,
                         verify_checkpoint)
from .builders import Schedule, timm_scheduler
from .metrics import METRICS_NAME, WINDOW_KEYS, TrainWindow
from .restore import restore_checkpoint
from .run import EXPORT_DIR
from .run_format import current_meta, migrate, read_run_config
from .state import TrainState
from .weights import BEST_NAME, best_is_later

__all__ = ["CheckpointMismatchError", "RUN_OUTPUTS", "Resumed", "check_compatible", "continue_in",
           "discard_newer_checkpoints", "resolve_resume", "restart_schedule", "restore_window", "resume_run",
           "resume_state", "run_history", "run_meta", "run_outputs"]

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


def run_history(output_dir: Path, cfg: TrainConfig, resumed: "Resumed", step: int) -> list[dict[str, Any]]:
    """``config.yaml``'s ``history``: how the run started, then each resume with the step and what it changed."""
    start = {"event": "start", "step": 0, "config": cfg.to_dict()}
    if resumed.checkpoint is None:
        return [start]
    previous = [{"event": "start", "step": 0, "config": None}]  # a checkpoint whose run folder lost its config
    for path in (output_dir / CONFIG_NAME, resumed.checkpoint.parent.parent / CONFIG_NAME):
        if path.is_file():
            previous = read_run_config(path)["history"]
            break
    return previous + [{"event": "resume", "step": step, "checkpoint": resumed.checkpoint.name,
                        "changed": resumed.changes}]


# ------------------------------------------------------------------------------------------------
# the run continues: schedule, EMA, best epoch, metrics window, run folder
# ------------------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """What a resume found and did (a fresh run: no checkpoint, nothing changed)."""

    checkpoint: Optional[Path] = None
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    later_best: bool = False  # the best-epoch file was written after the resumed step (removed by continue_in)


def restart_schedule(cfg: TrainConfig, optimizer: Any, schedule: Schedule, step: int, steps_per_epoch: int) -> None:
    """A resume that changes the schedule (``lr``, ``epochs``, ``sched``, ``min_lr``, warm-up): a fresh
    ``cfg.sched`` schedule from ``cfg.lr`` at ``step`` to ``cfg.min_lr`` at the end of ``cfg.epochs``, without
    warm-up -- what the flags say, applied from here on (the steps done keep the lr they were trained with)."""
    remaining = cfg.epochs * steps_per_epoch - step
    if remaining <= 0:
        return
    for group in optimizer.param_groups:  # timm takes the peak from initial_lr, which the checkpoint restored
        group["lr"] = group["initial_lr"] = cfg.lr
    schedule.scheduler = timm_scheduler(cfg, optimizer, steps_per_epoch, remaining / steps_per_epoch, 0.0)
    schedule.start_step = step
    schedule.step_update(step)
    logger.warning("the learning-rate schedule restarts at step %d: %s from lr=%g to %g over the remaining %d steps",
                   step, cfg.sched, cfg.lr, cfg.min_lr, remaining)


def resume_run(accelerator: Any, checkpoint: Path, cfg: TrainConfig, meta: dict[str, Any], state: TrainState,
               optimization: tuple[Any, Schedule], steps_per_epoch: int, ema: Any = None,
               backbone: Optional[torch.nn.Module] = None) -> Resumed:
    """Continue from ``checkpoint`` (every process): refuse what cannot continue, restore every state, restart
    the schedule a changed key asks for, start an EMA the checkpoint lacks from the resumed ``backbone``, and
    forget a best epoch chosen after the resumed step. The full model and optimizer are restored on every
    process, so any engine, cut or pipeline width resumes any checkpoint."""
    optimizer, schedule = optimization
    changes = resume_state(accelerator, checkpoint, meta, cfg, state, steps_per_epoch)
    if any(k in changes for k in SCHEDULE_KEYS):
        restart_schedule(cfg, optimizer, schedule, state.global_step, steps_per_epoch)
    if ema is not None and "ema" not in read_checkpoint_meta(checkpoint).get("states", []):
        logger.warning("%s holds no EMA: the EMA starts from the resumed weights", checkpoint)
        ema.module.load_state_dict(backbone.state_dict())
    later_best = best_is_later(cfg.resolved_output_dir(), state)  # every process forgets it
    accelerator.wait_for_everyone()  # before process 0 removes the file (continue_in)
    return Resumed(checkpoint, changes, later_best)


def restore_window(window: TrainWindow, saved: Optional[list[float]], accelerator: Any) -> None:
    """The train-metric window of the checkpoint's loop position, so a run resumed between two rows logs the
    rows an uninterrupted run logs. The saved sums are the totals over processes: the main process carries
    them and the others start from zero, so the next row's all-reduce gives the same totals (bit-identical in
    one process; with several, the float64 loss sums may be added in another order)."""
    if saved is None:
        return
    totals = torch.tensor(saved, dtype=torch.float64, device=accelerator.device)
    if not accelerator.is_main_process:
        totals = torch.zeros_like(totals)
    window.sums = dict(zip(WINDOW_KEYS, totals.view(len(WINDOW_KEYS), -1).unbind(0)))


def continue_in(output_dir: Path, resumed: Resumed, trust_pickle: bool) -> None:
    """The run folder made this continuation's (main process, once set-up has passed, before config.yaml is
    written): newer checkpoints and a later best-epoch file removed, the folder in the current run format."""
    discard_newer_checkpoints(output_dir, resumed.checkpoint)
    migrate(output_dir, trust_pickle)  # lossless, once: the folder then holds the current run format
    if resumed.later_best:
        (output_dir / BEST_NAME).unlink()
