"""The step loop of a run, and the hook protocol its periodic jobs follow (detectron2's ``TrainerBase`` /
``HookBase`` shape).

Why hooks: checkpoints, evaluation, the metrics window, the non-finite guard, the EMA, progress and
preemption each run at a few points of the loop, and each new job of that kind would otherwise become
one more branch in it. The :class:`Trainer` holds the run's state explicitly (no closures over shared
variables) and calls every hook, in the order they were registered, at each point::

    before_train
    per epoch:   before_epoch
                 per step:  before_step, (forward/backward) after_backward, (optimizer step) after_step
                 after_epoch
    after_train
    on_stop(error)    instead of the remaining calls, when the run stops with an error (a hook's stop:
                      non-finite, preempted, a checkpoint that could not be written; or any other)

The built-in hooks and their order are in :mod:`.hooks` (:func:`~.hooks.default_hooks`); a user's hooks
(``fit(cfg, runner, hooks=[...])``) run after them. The order is part of the behaviour: a resumed run is
bitwise the uninterrupted one only because the evaluation, the saves and the metrics rows happen at the
same points in the same order.
"""
from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import TrainConfig
from .builders import freeze_batchnorm
from .finite import NonFiniteLossError
from .metrics import MetricsLog, TrainWindow
from .preempt import Preempted
from .state import TrainState

__all__ = ["HOOK_EVENTS", "Hook", "Trainer"]

#: The calls a hook receives, in the order of one step (``on_stop`` only when the run stops with an error).
HOOK_EVENTS = ("before_train", "before_epoch", "before_step", "after_backward", "after_step", "after_epoch",
               "after_train", "on_stop")
#: The stops after which the trackers are ended as at a normal end (the run's records are complete up to them).
ENDS_TRACKERS = (NonFiniteLossError, Preempted)


class Hook:
    """A periodic job of the loop: override the calls it needs; ``self.trainer`` is the running
    :class:`Trainer` (a weak proxy: hooks and trainer do not keep each other alive)."""

    trainer: Any = None

    def before_train(self) -> None:
        """Before the first epoch (also when a resumed run has nothing left to train)."""

    def before_epoch(self) -> None:
        """Before the first step of ``trainer.epoch`` (the model is in training mode)."""

    def before_step(self) -> None:
        """Before the step's forward pass (cheap work only)."""

    def after_backward(self) -> None:
        """Gradients summed and synchronised, before ``optimizer.step()``: ``trainer.step_error`` is the
        step's agreed loss error, if any. Raising here stops the run before the step is taken."""

    def after_step(self) -> None:
        """After ``optimizer.step()`` and the schedule's update: ``trainer.sums`` / ``trainer.lr_used``."""

    def after_epoch(self) -> None:
        """After the step loop of ``trainer.epoch``; ``trainer.state`` already points past it when complete."""

    def after_train(self) -> None:
        """After the last epoch, before the export."""

    def on_stop(self, error: BaseException) -> None:
        """The run stops with ``error`` (raised by a hook, the engine or the data): release what the hook holds."""


class Trainer:
    """One run's training state and its step loop; every periodic job is a :class:`Hook`.

    Besides the state, the trainer carries what one step or epoch tells the hooks: ``sums`` (the step's
    per-stage metric sums), ``lr_used``, ``step_error`` / ``inputs`` (for the non-finite guard),
    ``train_row`` (the ``train`` row logged at this step, if any), ``eval_row`` (this epoch's evaluation),
    ``unsaved_eval`` (an evaluation not yet in a checkpoint) and ``last_checkpoint``.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Any, runner: Any, lm: Any, optimizer: Any, schedule: Any,
                 state: TrainState, targets: Any, metrics: MetricsLog, window: TrainWindow, ema: Any,
                 output_dir: Path, last_checkpoint: Optional[Path] = None) -> None:
        self.cfg, self.accelerator, self.runner, self.lm = cfg, accelerator, runner, lm
        self.optimizer, self.schedule, self.state, self.targets = optimizer, schedule, state, targets
        self.metrics, self.window, self.ema, self.output_dir = metrics, window, ema, output_dir
        self.steps_per_epoch: int = runner.steps_per_epoch
        self.last_checkpoint = last_checkpoint
        self.hooks: list[Hook] = []
        self.stopped_early = state.epoch >= cfg.epochs or (cfg.max_steps is not None
                                                          and state.global_step >= cfg.max_steps)
        self.epoch = state.epoch
        self.epoch_started = time.perf_counter()
        self.sums: dict[str, Any] = {}
        self.lr_used = 0.0
        self.step_error: Optional[str] = None
        self.inputs: Any = None
        self.train_row: Optional[dict[str, Any]] = None
        self.eval_row: Optional[dict[str, Any]] = None
        self.unsaved_eval = False

    def register_hooks(self, hooks: Sequence[Optional[Hook]]) -> None:
        """Add ``hooks`` (``None`` skipped) after those registered: they are called in this order."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = weakref.proxy(self)
                self.hooks.append(hook)

    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    def train(self) -> None:
        """The epochs left to train (none when a resumed run is complete), then ``after_train``."""
        try:
            self.call("before_train")
            while not self.stopped_early and self.state.epoch < self.cfg.epochs:
                self.run_epoch()
            self.call("after_train")
        except BaseException as e:
            self.call("on_stop", e)
            if isinstance(e, ENDS_TRACKERS):
                self.accelerator.end_training()
            raise

    def run_epoch(self) -> None:
        """The steps left in ``state.epoch`` (a mid-epoch resume skips those done), to its end or ``max_steps``."""
        self.epoch = self.state.epoch
        self.lm.train()
        if self.cfg.freeze_bn:
            freeze_batchnorm(self.lm)
        self.epoch_started = time.perf_counter()
        self.call("before_epoch")
        for group in self.runner.batches(self.epoch, self.state.step_in_epoch):
            self.train_row = None
            self.call("before_step")
            self.run_step(group)
            self.call("after_step")
            if self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps:
                self.stopped_early = True
                break
        self.state.train_time_s += time.perf_counter() - self.epoch_started
        self.eval_row = None
        if self.state.step_in_epoch >= self.steps_per_epoch:  # complete: the state points at the next epoch
            self.state.epoch, self.state.step_in_epoch = self.epoch + 1, 0
        self.call("after_epoch")

    def run_step(self, group: list[tuple[Any, Any]]) -> None:
        """One optimizer step over ``group`` (gradient accumulation: gradients summed, synchronised after the last)."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Any] = {}
        error: Optional[str] = None
        try:
            for i, (x, y) in enumerate(group):
                x, y = self.targets(x, y)
                self.inputs = x
                with self.accelerator.autocast():
                    part = self.runner.step(x, y, sync=i == len(group) - 1)
                sums = {k: sums[k] + v for k, v in part.items()} if sums else part
        except FloatingPointError as e:  # raised by the engine before any optimizer step
            error = f"loss ({e})"
        self.step_error = self.runner.agree_on_error(error)
        if self.step_error is None:
            self.runner.sync_gradients(self.cfg.clip_grad)
        self.call("after_backward")
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        self.schedule.step_update(self.state.global_step)
        self.sums = sums

    def epoch_complete(self) -> bool:
        """Whether the epoch just run ended at its last step (else ``max_steps`` stopped it inside)."""
        return self.state.epoch > self.epoch

    def consolidate(self) -> None:
        """Every process holds the whole trained state, BatchNorm statistics made equal (--dist-bn): before
        each evaluation, checkpoint and the export."""
        self.runner.consolidate(self.optimizer)
        world = self.accelerator.num_processes
        if self.cfg.engine == "sequential" and world > 1 and self.cfg.dist_bn != "none":  # the pipeline's: replica 0's
            from timm.utils import distribute_bn

            for module in (self.lm, self.ema.module if self.ema is not None else None):
                if module is not None:
                    distribute_bn(module, world, reduce=self.cfg.dist_bn == "reduce")
