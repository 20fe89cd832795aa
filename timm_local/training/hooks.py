"""The built-in hooks of the training loop, in the order :func:`default_hooks` registers them.

1. :class:`NonFiniteStop` -- nothing non-finite is stepped: buffers kept before each step, the step checked
   after the backward pass (undone and the run stopped when it fails).
2. :class:`EMAUpdate` -- the weights' exponential moving average after each optimizer step.
3. :class:`MetricsWindow` -- the per-stage sums of the steps, a ``train`` row every ``--log-every`` steps
   and at each epoch's last step (with the epoch's peak memory so far).
4. :class:`Progress` -- the progress bar (and logging routed above it).
5. :class:`Evaluation` -- at epoch ends when due, where ``max_steps`` stops inside an epoch, and once at the
   end if the last state was not evaluated; the best epoch's weights (``--export-weights best``).
6. :class:`Checkpointing` -- every ``--checkpoint-every-steps`` inside an epoch, at each epoch's end (after
   its evaluation, so the checkpoint holds it) and after a final evaluation; consolidated first.
7. :class:`Console` -- one line per epoch for the person at the terminal.
8. :class:`Preemption` -- a preemption signal: a checkpoint of the step, then :class:`~.preempt.Preempted`.

Why this order: a step's window must be summed and its row logged before a checkpoint saves the window;
an epoch's evaluation must precede its checkpoint (which saves the best result); the console line reports
both; a preemption is acted on last, once the step's regular work (and any checkpoint of it) is done.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

from ..memory import peak_memory_across_processes, reset_peak_memory
from .checkpoint import checkpoint_step, latest_checkpoint, save_checkpoint
from .console import epoch_line
from .evaluate import evaluate
from .finite import FINITE_KEY, FiniteGuard, NonFiniteLossError, good_checkpoint, non_finite_advice, non_finite_message
from .preempt import PreemptionWatch
from .trainer import Hook
from .weights import is_better, write_best

__all__ = ["Checkpointing", "Console", "EMAUpdate", "Evaluation", "MetricsWindow", "NonFiniteStop", "Preemption",
           "Progress", "default_hooks"]

logger = logging.getLogger(__name__)


class NonFiniteStop(Hook):
    """Stops the run, before the optimizer step or the checkpoint, when anything is not finite (:mod:`.finite`)."""

    def __init__(self, guard: FiniteGuard) -> None:
        self.guard = guard

    def before_step(self) -> None:
        self.guard.before_step()

    def after_backward(self) -> None:
        t = self.trainer
        error = t.step_error
        if error is None:
            problem = t.runner.agree_on_error(self.guard.check_step())
            error = None if problem is None else f"step ({problem})"
        if error is not None:
            self.guard.undo_step()
            raise self.stop(error, t.inputs)

    def check_state(self) -> None:
        """Raise the stop if the state a checkpoint would hold is not finite (every process calls it)."""
        problem = self.trainer.runner.agree_on_error(self.guard.check_state(self.trainer.optimizer))
        if problem is not None:
            raise self.stop(f"state before the checkpoint ({problem})")

    def stop(self, what: str, inputs: Any = None) -> NonFiniteLossError:
        """The non-finite stop, logged as an ``error`` row; the caller raises it."""
        t = self.trainer
        good = good_checkpoint(t.output_dir, t.state.global_step, inputs)
        msg = non_finite_message(what, t.state.epoch, t.state.global_step, good, good == latest_checkpoint(t.output_dir),
                                 non_finite_advice(t.cfg, inputs))
        t.metrics.log({"kind": "error", "epoch": t.state.epoch, "step": t.state.global_step, "error": msg},
                      write=None if t.runner.errors_agreed else True)  # a pipeline rank may be alone in knowing
        return NonFiniteLossError(msg)


class EMAUpdate(Hook):
    """timm's ``ModelEmaV3`` after each optimizer step, told the updates done (timm's train.py)."""

    def after_step(self) -> None:
        t = self.trainer
        t.ema.update(t.lm.backbone, step=t.state.global_step)


class MetricsWindow(Hook):
    """The training metrics: each step's sums into the window, a ``train`` row when due (one all-reduce)."""

    def before_epoch(self) -> None:
        reset_peak_memory(self.trainer.accelerator.device)  # train rows carry this epoch's peak memory so far

    def after_step(self) -> None:
        t = self.trainer
        t.window.add(t.sums)
        if t.state.global_step % t.cfg.log_every == 0 or t.state.step_in_epoch == t.steps_per_epoch:
            row = t.window.row(t.accelerator, t.epoch, t.state.global_step, t.lr_used)  # all-reduce of the sums
            row.update(peak_memory_across_processes(t.accelerator))  # and a gather: this epoch's peak so far
            t.metrics.log(row)
            t.train_row = row


class Progress(Hook):
    """tqdm's bar on the main process; log lines are routed above it while it is shown."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.routed = contextlib.ExitStack()

    def before_train(self) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        t = self.trainer
        total = t.steps_per_epoch * t.cfg.epochs
        if t.cfg.max_steps is not None:
            total = min(total, t.cfg.max_steps)
        self.bar = tqdm(total=total, initial=t.state.global_step, disable=not t.accelerator.is_main_process,
                        desc=self.description, dynamic_ncols=True)
        self.routed.enter_context(logging_redirect_tqdm())  # log lines above the bar, never glued onto it

    def after_step(self) -> None:
        self.bar.update(1)
        row = self.trainer.train_row
        if row is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")

    def write(self, line: str) -> None:
        self.bar.write(line)

    def after_train(self) -> None:
        self.close()

    def on_stop(self, error: BaseException) -> None:
        self.close()  # the error's line below the bar, not glued to it

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.routed.close()


class Evaluation(Hook):
    """The test set's evaluation (backbone, EMA, heads) into an ``eval`` row and the best result."""

    def __init__(self, test_loader: Any) -> None:
        self.test_loader = test_loader

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.epoch_complete():
            self.run(t.epoch, False)  # stopped by max_steps inside the epoch: not a candidate for the best epoch
        elif t.state.epoch % t.cfg.eval_every == 0 or t.state.epoch == t.cfg.epochs or t.stopped_early:
            self.run(t.state.epoch, True)

    def after_train(self) -> None:
        t = self.trainer
        if t.state.last_top1 is None:  # the last state was not evaluated
            self.run(t.state.epoch, t.state.step_in_epoch == 0)

    def run(self, epoch_done: int, epoch_end: bool) -> dict[str, Any]:
        """Evaluate, log the row, keep the best (an epoch end's only: a mid-epoch state is no epoch)."""
        t, cfg, state = self.trainer, self.trainer.cfg, self.trainer.state
        t.consolidate()
        result = evaluate(t.lm, self.test_loader, t.accelerator, heads=cfg.eval_heads,
                          ema=t.ema.module if t.ema else None)
        state.last_top1, state.best_top1 = result["top1"], max(state.best_top1, result["top1"])
        value = result[cfg.eval_metric]
        if epoch_end and is_better(cfg.eval_metric, value, state.best_metric):
            state.best_metric, state.best_epoch = value, epoch_done
            if t.accelerator.is_main_process and cfg.export and cfg.export_weights == "best":
                write_best(t.lm.backbone, t.output_dir, epoch_done, state.global_step, cfg.eval_metric, value)
        row = {"kind": "eval", "epoch": epoch_done, "step": state.global_step, **result, "best_top1": state.best_top1,
               "best_epoch": state.best_epoch}
        t.metrics.log(row)
        t.eval_row, t.unsaved_eval = row, True
        return result


class Checkpointing(Hook):
    """The checkpoints a later ``--resume`` continues from exactly (:mod:`.checkpoint`), each checked finite."""

    def __init__(self, meta: dict[str, Any], finite: NonFiniteStop) -> None:
        self.meta = meta
        self.finite = finite

    def after_step(self) -> None:
        t = self.trainer
        every = t.cfg.checkpoint_every_steps
        if every and t.state.global_step % every == 0 and t.state.step_in_epoch < t.steps_per_epoch:
            self.save("steps")

    def after_epoch(self) -> None:
        self.save("epoch" if self.trainer.epoch_complete() else "max_steps")

    def after_train(self) -> None:
        if self.trainer.unsaved_eval:  # the final evaluation's result
            self.save("final")

    def save(self, reason: str) -> Path:
        t = self.trainer
        t.consolidate()
        self.finite.check_state()
        t.state.window = t.window.state(t.accelerator)
        path = save_checkpoint(t.accelerator, t.output_dir, t.state, {**self.meta, FINITE_KEY: True},
                               t.cfg.keep_checkpoints)
        if t.accelerator.is_main_process:
            logger.info("checkpoint (%s): %s", reason, path)
        t.last_checkpoint, t.unsaved_eval = path, False
        return path


class Console(Hook):
    """One line per epoch: its last train loss, its evaluation (if any) and where the run is."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.loss: Optional[float] = None

    def after_step(self) -> None:
        if self.trainer.train_row is not None:
            self.loss = self.trainer.train_row["loss"]

    def after_epoch(self) -> None:
        t = self.trainer
        if t.accelerator.is_main_process:
            self.progress.write(epoch_line(t.epoch + 1, t.cfg.epochs, self.loss, t.eval_row,
                                           time.perf_counter() - t.epoch_started, t.output_dir,
                                           partial=not t.epoch_complete()))


class Preemption(Hook):
    """A preemption signal on any process (agreed at each step's end): a checkpoint of the step, then the stop."""

    def __init__(self, watch: PreemptionWatch, checkpointing: Checkpointing) -> None:
        self.watch = watch
        self.checkpointing = checkpointing

    def after_step(self) -> None:
        t = self.trainer
        if t.state.step_in_epoch < t.steps_per_epoch and self.watch.requested(t.accelerator):
            raise self.stop()

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.stopped_early and t.state.epoch < t.cfg.epochs and self.watch.requested(t.accelerator):
            raise self.stop()

    def stop(self) -> Exception:
        """A checkpoint of this step (unless just written); the caller raises the returned stop."""
        path = self.trainer.last_checkpoint
        if path is None or checkpoint_step(path) != self.trainer.state.global_step:
            path = self.checkpointing.save("preempted")
        return self.watch.stopped(self.trainer.state.global_step, path)


def default_hooks(finite: FiniteGuard, ema: bool, test_loader: Any, meta: dict[str, Any], watch: PreemptionWatch,
                  description: str) -> list[Hook]:
    """The built-in hooks, in their order (module docstring); ``ema``: whether the run keeps an EMA."""
    guard = NonFiniteStop(finite)
    progress = Progress(description)
    checkpointing = Checkpointing(meta, guard)
    return [guard, EMAUpdate() if ema else None, MetricsWindow(), progress, Evaluation(test_loader), checkpointing,
            Console(progress), Preemption(watch, checkpointing)]
