"""The training loop, once for every engine: :func:`fit`.

:func:`fit` is an ordinary Accelerate script (accelerate's ``complete_cv_example.py`` shape): set-up,
resume, a :class:`~.trainer.Trainer` running the epochs of steps with its hooks (:mod:`.hooks`: the
non-finite guard, EMA, metrics, progress, evaluation, checkpoints, console, preemption), export, trackers.
What differs between engines is behind a :class:`~timm_local.training.runners.Runner` (where batches come
from, one local step, gradient synchronisation, consolidation), so the sequential and pipelined engines
cannot drift apart: the same NaN stop, resume, evaluation and export.

Data order is a function of (seed, epoch) (Accelerate's seedable sampler, or a seeded
``DistributedSampler``) and augmentation of (seed, epoch, index) (:mod:`timm_local.data.seeded`), so a
resumed run sees the same batches -- also when resumed mid-epoch, where the consumed batches are skipped.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from ..config import CONFIG_NAME, ConfigError, TrainConfig, validate_config
from ..distributed import RollCall
from ..export import to_jsonable
from ..format_version import FORMAT_VERSION, VERSION_KEY
from .builders import (build_local_model, check_precision, device_batches, eval_batch_size, make_accelerator,
                       make_loader, normalize_on_device, prepare_optimization, run_datasets, settled_by_accelerate,
                       tune_convolutions)
from .checkpoint import add_checkpoint_state, any_process, write_error
from .console import memory_route_line, start_line
from .finite import FiniteGuard, NonFiniteLossError
from .hooks import default_hooks
from .lock import hold_run_folder
from .metrics import METRICS_NAME, MetricsLog, TrainWindow, scalar_config, tracker_names
from .preempt import Preempted, PreemptionWatch, parse_signals
from .resolved import resolve_choices
from .resume import Resumed, continue_in, resolve_resume, restore_window, resume_run, run_history, run_meta
from .run import EXPORT_DIR, export_trained
from .runners import Runner, make_runner
from .starting import architecture_only, weights_source
from .state import TrainResult, TrainState
from .targets import Targets
from .trainer import Hook, Trainer
from .weights import create_ema, weights_to_export

__all__ = ["NonFiniteLossError", "Preempted", "fit"]

logger = logging.getLogger(__name__)


def fit(cfg: TrainConfig, runner: Optional[Runner] = None, hooks: Optional[Sequence[Hook]] = None) -> TrainResult:
    """Train ``cfg`` with ``runner``'s engine (by default the one ``cfg.engine`` names; every process of a
    launch calls it) and export the backbone. The configuration is validated here, once.

    ``hooks`` run after the built-in ones (:mod:`.hooks`) at each point of the loop (:mod:`.trainer`). The
    main process holds the run folder's lock (:mod:`.lock`) and every process watches for preemption signals
    (:mod:`.preempt`) until it returns.
    """
    validate_config(cfg)
    runner = runner if runner is not None else make_runner(cfg)
    try:
        signals = parse_signals(cfg.preempt_signals)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    output_dir = cfg.resolved_output_dir()
    accelerator = make_accelerator(cfg, output_dir)
    cfg = settled_by_accelerate(cfg, accelerator)  # mixed precision and accumulation as Accelerate resolved them
    check_precision(cfg)
    roll = RollCall.take(cfg.collective_timeout)  # every process of the launch is here, or who is not
    runner.check_launch(accelerator.num_processes, cfg.grad_accum_steps)
    lock = hold_run_folder(accelerator, output_dir)  # a second run in this folder stops here, naming the first
    watch = PreemptionWatch(signals).install()
    try:
        return _fit(cfg, runner, accelerator, roll, watch, list(hooks or []))
    finally:
        watch.close()
        if lock is not None:
            lock.release()


@dataclass
class _SetUp:
    """What the set-up found and built, before anything is written into the run folder."""

    cfg: TrainConfig
    data: Any
    lm: Any
    test_loader: Any
    targets: Targets
    optimizer: Any
    schedule: Any
    state: TrainState
    ema: Any
    meta: dict[str, Any]
    resumed: Resumed
    default_dataset: bool


def _set_up(cfg: TrainConfig, runner: Runner, accelerator: Any, roll: RollCall) -> _SetUp:
    """Data, model, optimizer and the resumed state: nothing is written before they are known to work."""
    from accelerate.utils import set_seed

    output_dir = cfg.resolved_output_dir()
    world = accelerator.num_processes
    resume_from = resolve_resume(cfg, output_dir)
    set_seed(cfg.seed)

    on_device = normalize_on_device(cfg, accelerator.device)
    tune_convolutions(accelerator.device)
    train_set, test_set, data = run_datasets(cfg, normalize=not on_device)
    test_loader = device_batches(accelerator.prepare(make_loader(test_set, eval_batch_size(cfg, world), cfg)), data,
                                 accelerator.device, on_device)
    lm = build_local_model(cfg if resume_from is None else architecture_only(cfg), data).to(accelerator.device)
    default_dataset = cfg.dataset is None
    cfg = resolve_choices(cfg, data, lm)  # config.yaml and checkpoints say the dataset, d and tau used
    targets = Targets(cfg, data.num_classes, lm.method)  # labels, or smoothed / mixed class distributions
    targets.check_batch(runner.per_process_batch)
    roll.barrier("the end of set-up (datasets read, model built)")  # a node whose set-up failed is named
    runner.attach(accelerator, lm, train_set, data)
    steps_per_epoch = runner.steps_per_epoch
    optimizer, schedule, state = prepare_optimization(cfg, lm, accelerator, steps_per_epoch)
    ema = create_ema(cfg, lm.backbone)  # after the start-up broadcast: every process's EMA starts alike
    if ema is not None:
        add_checkpoint_state(accelerator, "ema", ema.module)  # ema.safetensors, saved and resumed with the rest
    meta = run_meta(cfg, lm, data, world)
    resumed = Resumed() if resume_from is None else resume_run(
        accelerator, resume_from, cfg, meta, state, (optimizer, schedule), steps_per_epoch, ema, lm.backbone)
    return _SetUp(cfg, data, lm, test_loader, targets, optimizer, schedule, state, ema, meta, resumed,
                  default_dataset)


def _open_run_folder(s: _SetUp, runner: Runner, accelerator: Any, roll: RollCall) -> MetricsLog:
    """From here on the run writes into its folder: config.yaml, the metrics log, the trackers."""
    cfg, output_dir, world = s.cfg, s.cfg.resolved_output_dir(), accelerator.num_processes
    steps_per_epoch = runner.steps_per_epoch
    resolved = {VERSION_KEY: FORMAT_VERSION, **cfg.to_dict(), "output_dir": str(output_dir),
                "data": dataclasses.asdict(s.data), "method_config": s.lm.method_config,
                "runtime": {"num_processes": world, "steps_per_epoch": steps_per_epoch,
                            "total_steps": steps_per_epoch * cfg.epochs, "device": str(accelerator.device),
                            "mixed_precision": accelerator.mixed_precision,
                            "per_process_batch": runner.per_process_batch, **runner.runtime(),
                            "resumed_from": str(s.resumed.checkpoint) if s.resumed.checkpoint else None,
                            "weights_from": weights_source(cfg)[0]},
                "history": run_history(output_dir, cfg, s.resumed, s.state.global_step)}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        continue_in(output_dir, s.resumed, cfg.trust_pickle)
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(to_jsonable(resolved), sort_keys=False))
    accelerator.wait_for_everyone()
    roll.check_shared_folder(output_dir)  # checkpoints and resume need one folder seen by every node
    metrics = MetricsLog(accelerator, output_dir / METRICS_NAME, s.state.global_step if s.resumed.checkpoint else None)
    if tracker_names(cfg.trackers):
        accelerator.init_trackers("timm_local", config=scalar_config(cfg.to_dict()))
    return metrics


def _fit(cfg: TrainConfig, runner: Runner, accelerator: Any, roll: RollCall, watch: PreemptionWatch,
         hooks: list[Hook]) -> TrainResult:
    """:func:`fit` once the run folder is this run's: set-up, the trainer with its hooks, the export."""
    s = _set_up(cfg, runner, accelerator, roll)
    window = TrainWindow()  # per-stage sums since the last train row
    restore_window(window, s.state.window, accelerator)
    guard = FiniteGuard(s.lm, check_gradients=accelerator.scaler is None)
    metrics = _open_run_folder(s, runner, accelerator, roll)
    output_dir = s.cfg.resolved_output_dir()
    if accelerator.is_main_process:
        logger.info(start_line(s.cfg, s.data, s.lm, output_dir, accelerator.num_processes, s.default_dataset))
        logger.info(memory_route_line(accelerator.device))
    trainer = Trainer(s.cfg, accelerator, runner, s.lm, s.optimizer, s.schedule, s.state, s.targets, metrics, window,
                      s.ema, output_dir, last_checkpoint=s.resumed.checkpoint)
    trainer.register_hooks(default_hooks(guard, s.ema is not None, s.test_loader, s.meta, watch,
                                         f"{s.cfg.model}/{s.lm.method_name}{runner.label}") + hooks)
    trainer.train()
    return _finish(trainer, s.data)


def _finish(trainer: Trainer, data: Any) -> TrainResult:
    """The export (of what ``--export-weights`` names) and the summary row, once training is over."""
    cfg, accelerator, state, lm, output_dir = trainer.cfg, trainer.accelerator, trainer.state, trainer.lm, \
        trainer.output_dir
    trainer.consolidate()
    export_dir = None
    if cfg.export:
        export_dir = output_dir / EXPORT_DIR
        failed: Optional[OSError] = None
        if accelerator.is_main_process:
            try:
                backbone, which = weights_to_export(cfg, lm.backbone, trainer.ema, output_dir)
                export_trained(backbone, lm.method_name, lm.method_config, export_dir, cfg, data, state, which)
            except OSError as e:  # a half export must not make the folder look finished
                shutil.rmtree(export_dir, ignore_errors=True)
                failed = e
        if any_process(accelerator, failed is not None):
            raise write_error(failed or OSError(errno.EIO, "failed on the main process"), "the export", output_dir)
    trainer.metrics.log({"kind": "summary", "epoch": state.epoch, "step": state.global_step, "top1": state.last_top1,
                         "best_top1": state.best_top1, "best_epoch": state.best_epoch,
                         "train_time_s": state.train_time_s, "complete": state.epoch >= cfg.epochs})
    trainer.runner.close()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, top1=state.last_top1, best_top1=state.best_top1,
                       global_step=state.global_step, epochs_completed=state.epoch, train_time_s=state.train_time_s,
                       export_dir=export_dir, last_checkpoint=trainer.last_checkpoint, metrics=list(trainer.metrics.rows))
