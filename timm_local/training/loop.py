"""The training loop, once for every engine: :func:`fit`.

Read top to bottom, :func:`fit` is an ordinary Accelerate script (accelerate's
``complete_cv_example.py`` shape): set-up, resume, epochs of steps, evaluation, checkpoints, export,
trackers. What differs between engines is behind a :class:`~timm_local.training.runners.Runner`
(where batches come from, one local step, gradient synchronisation, consolidation), so the sequential
and pipelined engines cannot drift apart: the same NaN stop, resume, evaluation and export.

Data order is a function of (seed, epoch) (Accelerate's seedable sampler, or a seeded
``DistributedSampler``) and augmentation of (seed, epoch, index) (:mod:`timm_local.data.seeded`), so a
resumed run sees the same batches -- also when resumed mid-epoch, where the consumed batches are skipped.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..config import CONFIG_NAME, SCHEDULE_KEYS, ConfigError, TrainConfig, validate_config
from ..distributed import RollCall
from ..export import to_jsonable
from ..memory import peak_memory_across_processes, reset_peak_memory
from .builders import (build_local_model, check_precision, device_batches, eval_batch_size, freeze_batchnorm,
                       make_accelerator, make_loader, normalize_on_device, prepare_optimization, restart_schedule,
                       run_datasets, settled_by_accelerate, tune_convolutions)
from .checkpoint import (CheckpointWriteError, add_checkpoint_state, any_process, checkpoint_step, latest_checkpoint,
                         read_checkpoint_meta, save_checkpoint, write_error)
from .console import epoch_line, memory_route_line, start_line
from .evaluate import evaluate
from .finite import FINITE_KEY, FiniteGuard, NonFiniteLossError, good_checkpoint, non_finite_advice, non_finite_message
from .lock import hold_run_folder
from .metrics import METRICS_NAME, MetricsLog, TrainWindow, scalar_config, tracker_names
from .migrate import migrate_run_folder
from .preempt import Preempted, PreemptionWatch, parse_signals
from .resolved import resolve_choices
from .resume import discard_newer_checkpoints, resolve_resume, resume_state, run_history, run_meta
from .run import EXPORT_DIR, export_trained
from .runners import Runner
from .starting import weights_source
from .targets import Targets
from .weights import BEST_NAME, best_is_later, create_ema, is_better, weights_to_export, write_best
from .state import TrainResult, TrainState

__all__ = ["NonFiniteLossError", "Preempted", "close_epoch", "fit"]

logger = logging.getLogger(__name__)


def close_epoch(cfg: TrainConfig, state: TrainState, epoch: int, steps_per_epoch: int, stopped_early: bool,
                run_eval: Callable[[int, bool], Any], save: Callable[[str], Path]) -> Path:
    """After the step loop of ``epoch``: evaluate when due and write the checkpoint that lets a later
    ``--resume`` continue exactly here (epoch boundary, or mid-epoch when ``max_steps`` stopped it)."""
    if state.step_in_epoch >= steps_per_epoch:  # epoch complete
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs or stopped_early:
            run_eval(state.epoch, True)
        return save("epoch")
    run_eval(epoch, False)  # stopped by max_steps inside the epoch: not a candidate for the best epoch
    return save("max_steps")


def fit(cfg: TrainConfig, runner: Runner) -> TrainResult:
    """Train ``cfg`` with ``runner``'s engine (every process of a launch calls it) and export the backbone.

    The main process holds the run folder's lock (:mod:`.lock`) and every process watches for preemption
    signals (:mod:`.preempt`) until it returns.
    """
    validate_config(cfg)
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
        return _fit(cfg, runner, accelerator, roll, watch)
    finally:
        watch.close()
        if lock is not None:
            lock.release()


def _fit(cfg: TrainConfig, runner: Runner, accelerator: Any, roll: RollCall, watch: PreemptionWatch) -> TrainResult:
    """:func:`fit` once the run folder is this run's."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # ---- set-up: nothing is written before the config, data, model and checkpoint are known to work --
    output_dir = cfg.resolved_output_dir()
    world = accelerator.num_processes
    resume_from = resolve_resume(cfg, output_dir)
    set_seed(cfg.seed)

    on_device = normalize_on_device(cfg, accelerator.device)
    tune_convolutions(accelerator.device)
    train_set, test_set, data = run_datasets(cfg, normalize=not on_device)
    test_loader = device_batches(accelerator.prepare(make_loader(test_set, eval_batch_size(cfg, world), cfg)), data,
                                 accelerator.device, on_device)
    # a resume takes its weights from the checkpoint, not from the run's starting weights (which may be gone)
    fresh = dataclasses.replace(cfg, pretrained=False, initial_checkpoint=None)
    lm = build_local_model(cfg if resume_from is None else fresh, data).to(accelerator.device)
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
    changes: dict[str, Any] = {}
    later_best = False
    if resume_from is not None:  # full model and optimizer everywhere: any engine, cut or W resumes
        changes = resume_state(accelerator, resume_from, meta, cfg, state, steps_per_epoch)
        if any(k in changes for k in SCHEDULE_KEYS):
            restart_schedule(cfg, optimizer, schedule, state.global_step, steps_per_epoch)
        if ema is not None and "ema" not in read_checkpoint_meta(resume_from).get("states", []):
            logger.warning("%s holds no EMA: the EMA starts from the resumed weights", resume_from)
            ema.module.load_state_dict(lm.backbone.state_dict())
        later_best = best_is_later(output_dir, state)  # every process forgets it, before process 0 removes it
        accelerator.wait_for_everyone()
    last_checkpoint = resume_from
    window = TrainWindow()  # per-stage sums since the last train row
    window.restore(state.window, accelerator)
    guard = FiniteGuard(lm, check_gradients=accelerator.scaler is None)
    console: dict[str, Any] = {}  # the latest train loss and eval row, for each epoch's console line

    # ---- from here on the run writes into its folder ------------------------------------------------
    resolved = {**cfg.to_dict(), "output_dir": str(output_dir), "data": dataclasses.asdict(data),
                "method_config": lm.method_config,
                "runtime": {"num_processes": world, "steps_per_epoch": steps_per_epoch,
                            "total_steps": steps_per_epoch * cfg.epochs, "device": str(accelerator.device),
                            "mixed_precision": accelerator.mixed_precision,
                            "per_process_batch": runner.per_process_batch, **runner.runtime(),
                            "resumed_from": str(resume_from) if resume_from else None,
                            "weights_from": weights_source(cfg)[0]},
                "history": run_history(output_dir, cfg, resume_from, state.global_step, changes)}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        discard_newer_checkpoints(output_dir, resume_from)
        migrate_run_folder(output_dir, cfg.trust_pickle)  # lossless, once: the folder then holds no pickle
        if later_best:
            (output_dir / BEST_NAME).unlink()
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(to_jsonable(resolved), sort_keys=False))
    accelerator.wait_for_everyone()
    roll.check_shared_folder(output_dir)  # checkpoints and resume need one folder seen by every node
    metrics = MetricsLog(accelerator, output_dir / METRICS_NAME, state.global_step if resume_from else None)
    if tracker_names(cfg.trackers):
        accelerator.init_trackers("timm_local", config=scalar_config(cfg.to_dict()))

    def stop(what: str, inputs: Any = None) -> NonFiniteLossError:
        """The non-finite stop: logged, trackers ended; the caller raises it."""
        good = good_checkpoint(output_dir, state.global_step, inputs)
        msg = non_finite_message(what, state.epoch, state.global_step, good, good == latest_checkpoint(output_dir),
                                 non_finite_advice(cfg, inputs))
        metrics.log({"kind": "error", "epoch": state.epoch, "step": state.global_step, "error": msg},
                    write=None if runner.errors_agreed else True)  # a pipeline rank may be alone in knowing
        progress.close()
        accelerator.end_training()
        return NonFiniteLossError(msg)

    def consolidate() -> None:
        """Every process holds the whole trained state, BatchNorm statistics made equal (--dist-bn)."""
        runner.consolidate(optimizer)
        if cfg.engine == "sequential" and world > 1 and cfg.dist_bn != "none":  # the pipeline's are replica 0's
            from timm.utils import distribute_bn

            for module in (lm, ema.module if ema is not None else None):
                if module is not None:
                    distribute_bn(module, world, reduce=cfg.dist_bn == "reduce")

    def save(reason: str) -> Path:
        consolidate()
        problem = runner.agree_on_error(guard.check_state(optimizer))
        if problem is not None:
            raise stop(f"state before the checkpoint ({problem})")
        state.window = window.state(accelerator)
        try:
            path = save_checkpoint(accelerator, output_dir, state, {**meta, FINITE_KEY: True}, cfg.keep_checkpoints)
        except CheckpointWriteError:
            progress.close()  # the error line below the bar, not glued to it
            raise
        if accelerator.is_main_process:
            logger.info("checkpoint (%s): %s", reason, path)
        return path

    def preempted() -> Preempted:
        """The preemption stop: a checkpoint of this step (unless just written), trackers ended."""
        path = last_checkpoint
        if path is None or checkpoint_step(path) != state.global_step:
            path = save("preempted")
        progress.close()
        accelerator.end_training()
        return watch.stopped(state.global_step, path)

    def run_eval(epoch_done: int, epoch_end: bool) -> dict[str, Any]:
        consolidate()
        result = evaluate(lm, test_loader, accelerator, heads=cfg.eval_heads, ema=ema.module if ema else None)
        state.last_top1, state.best_top1 = result["top1"], max(state.best_top1, result["top1"])
        value = result[cfg.eval_metric]
        if epoch_end and is_better(cfg.eval_metric, value, state.best_metric):
            state.best_metric, state.best_epoch = value, epoch_done
            if accelerator.is_main_process and cfg.export and cfg.export_weights == "best":
                write_best(lm.backbone, output_dir, epoch_done, state.global_step, cfg.eval_metric, value)
        row = {"kind": "eval", "epoch": epoch_done, "step": state.global_step, **result, "best_top1": state.best_top1,
               "best_epoch": state.best_epoch}
        metrics.log(row)
        console["eval"] = row
        return result

    # ---- train ---------------------------------------------------------------------------------
    stopped_early = state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.global_step >= cfg.max_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if accelerator.is_main_process:
        logger.info(start_line(cfg, data, lm, output_dir, world, default_dataset))
        logger.info(memory_route_line(accelerator.device))
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_main_process,
                    desc=f"{cfg.model}/{lm.method_name}{runner.label}", dynamic_ncols=True)
    with logging_redirect_tqdm():  # log lines above the bar, never glued onto it
        while not stopped_early and state.epoch < cfg.epochs:
            epoch = state.epoch
            lm.train()
            if cfg.freeze_bn:
                freeze_batchnorm(lm)
            t_epoch = time.perf_counter()
            reset_peak_memory(accelerator.device)  # train rows carry this epoch's peak memory so far
            for group in runner.batches(epoch, state.step_in_epoch):
                optimizer.zero_grad(set_to_none=True)
                guard.before_step()
                error: Optional[str] = None
                sums: dict[str, Any] = {}
                try:
                    for i, (x, y) in enumerate(group):  # gradient accumulation: sum, sync after the last
                        x, y = targets(x, y)
                        with accelerator.autocast():
                            part = runner.step(x, y, sync=i == len(group) - 1)
                        sums = {k: sums[k] + v for k, v in part.items()} if sums else part
                except FloatingPointError as e:  # raised by the engine before any optimizer step
                    error = f"loss ({e})"
                error = runner.agree_on_error(error)
                if error is None:
                    runner.sync_gradients(cfg.clip_grad)
                    problem = runner.agree_on_error(guard.check_step())
                    error = None if problem is None else f"step ({problem})"
                if error is not None:
                    guard.undo_step()
                    raise stop(error, x)
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                state.global_step += 1
                if ema is not None:
                    ema.update(lm.backbone, step=state.global_step)  # timm's train.py: the updates done
                state.step_in_epoch += 1
                schedule.step_update(state.global_step)

                window.add(sums)
                progress.update(1)
                if state.global_step % cfg.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                    row = window.row(accelerator, epoch, state.global_step, lr_used)  # all-reduce of the sums
                    row.update(peak_memory_across_processes(accelerator))  # and a gather: this epoch's peak so far
                    metrics.log(row)
                    console["loss"] = row["loss"]
                    progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")
                if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0 \
                        and state.step_in_epoch < steps_per_epoch:
                    last_checkpoint = save("steps")
                if state.step_in_epoch < steps_per_epoch and watch.requested(accelerator):
                    raise preempted()
                if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                    stopped_early = True
                    break
            state.train_time_s += time.perf_counter() - t_epoch
            console.pop("eval", None)
            last_checkpoint = close_epoch(cfg, state, epoch, steps_per_epoch, stopped_early, run_eval, save)
            if accelerator.is_main_process:
                progress.write(epoch_line(epoch + 1, cfg.epochs, console.get("loss"), console.get("eval"),
                                          time.perf_counter() - t_epoch, output_dir, partial=state.epoch == epoch))
            if not stopped_early and state.epoch < cfg.epochs and watch.requested(accelerator):
                raise preempted()
    progress.close()

    # ---- finish: final evaluation (if the last state was not evaluated) and export ---------------
    if state.last_top1 is None:
        run_eval(state.epoch, state.step_in_epoch == 0)
        last_checkpoint = save("final")
    consolidate()
    export_dir = None
    if cfg.export:
        export_dir = output_dir / EXPORT_DIR
        failed: Optional[OSError] = None
        if accelerator.is_main_process:
            try:
                backbone, which = weights_to_export(cfg, lm.backbone, ema, output_dir)
                export_trained(backbone, lm.method_name, lm.method_config, export_dir, cfg, data, state, which)
            except OSError as e:  # a half export must not make the folder look finished
                shutil.rmtree(export_dir, ignore_errors=True)
                failed = e
        if any_process(accelerator, failed is not None):
            raise write_error(failed or OSError(errno.EIO, "failed on the main process"), "the export", output_dir)
    metrics.log({"kind": "summary", "epoch": state.epoch, "step": state.global_step, "top1": state.last_top1,
                 "best_top1": state.best_top1, "best_epoch": state.best_epoch, "train_time_s": state.train_time_s,
                 "complete": state.epoch >= cfg.epochs})
    runner.close()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, top1=state.last_top1, best_top1=state.best_top1,
                       global_step=state.global_step, epochs_completed=state.epoch, train_time_s=state.train_time_s,
                       export_dir=export_dir, last_checkpoint=last_checkpoint, metrics=list(metrics.rows))
