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
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from ..config import TrainConfig
from ..distributed import RollCall
from ..export import to_jsonable
from .builders import (build_local_model, eval_batch_size, freeze_batchnorm, make_accelerator, make_loader,
                       prepare_optimization, run_datasets)
from .checkpoint import latest_checkpoint, resolve_resume, resume_state, run_meta, save_checkpoint
from .evaluate import evaluate
from .metrics import METRICS_NAME, WINDOW_KEYS, MetricsLog, scalar_config, tracker_names, train_row
from .run import CONFIG_NAME, EXPORT_DIR, export_trained
from .runners import Runner
from .state import TrainResult, TrainState

__all__ = ["NonFiniteLossError", "close_epoch", "fit"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A local loss became NaN/inf. The run stopped without stepping; the last good checkpoint is kept."""


def close_epoch(cfg: TrainConfig, state: TrainState, epoch: int, steps_per_epoch: int, stopped_early: bool,
                run_eval: Callable[[int], Any], save: Callable[[str], Path]) -> Path:
    """After the step loop of ``epoch``: evaluate when due and write the checkpoint that lets a later
    ``--resume`` continue exactly here (epoch boundary, or mid-epoch when ``max_steps`` stopped it)."""
    if state.step_in_epoch >= steps_per_epoch:  # epoch complete
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs or stopped_early:
            run_eval(state.epoch)
        return save("epoch")
    run_eval(epoch)  # stopped by max_steps inside the epoch
    return save("max_steps")


def _non_finite_message(epoch: int, step: int, error: str, checkpoint: Optional[Path]) -> str:
    return (f"Non-finite loss at epoch {epoch}, step {step} ({error}). Training stopped before the optimizer "
            f"step. " + (f"The last good checkpoint is {checkpoint}; " if checkpoint else
                         "No checkpoint was written yet; ")
            + "lower --lr, use --warmup-epochs or --mixed-precision no, check --mean/--std, then resume with "
              "--resume auto.")


def fit(cfg: TrainConfig, runner: Runner) -> TrainResult:
    """Train ``cfg`` with ``runner``'s engine (every process of a launch calls it) and export the backbone."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # ---- set-up: nothing is written before the launch is known to work ----------------------------
    output_dir = cfg.resolved_output_dir()
    accelerator = make_accelerator(cfg, output_dir)
    world = accelerator.num_processes
    roll = RollCall.take(cfg.collective_timeout)  # every process of the launch is here, or who is not
    runner.check_launch(world)
    resume_from = resolve_resume(cfg, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    roll.check_shared_folder(output_dir)  # checkpoints and resume need one folder seen by every node
    set_seed(cfg.seed)

    train_set, test_set, data = run_datasets(cfg)
    test_loader = accelerator.prepare(make_loader(test_set, eval_batch_size(cfg, world), cfg))
    lm = build_local_model(cfg, data).to(accelerator.device)
    roll.barrier("the end of set-up (datasets read, model built)")  # a node whose set-up failed is named
    runner.attach(accelerator, lm, train_set, data)
    steps_per_epoch = runner.steps_per_epoch
    optimizer, scheduler, state = prepare_optimization(cfg, lm, accelerator, steps_per_epoch)
    meta = run_meta(cfg, lm, data, world)
    if resume_from is not None:  # full model and optimizer everywhere: any engine, cut or W resumes
        resume_state(accelerator, resume_from, meta, state, steps_per_epoch)
    last_checkpoint = resume_from

    resolved = {**cfg.to_dict(), "output_dir": str(output_dir), "data": dataclasses.asdict(data),
                "method_config": lm.method_config,
                "runtime": {"num_processes": world, "steps_per_epoch": steps_per_epoch,
                            "total_steps": steps_per_epoch * cfg.epochs, "device": str(accelerator.device),
                            "per_process_batch": runner.per_process_batch, **runner.runtime(),
                            "resumed_from": str(resume_from) if resume_from else None}}
    if accelerator.is_main_process:
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(to_jsonable(resolved), sort_keys=False))
    metrics = MetricsLog(accelerator, output_dir / METRICS_NAME, state.global_step if resume_from else None)
    if tracker_names(cfg.trackers):
        accelerator.init_trackers("timm_local", config=scalar_config(cfg.to_dict()))

    def save(reason: str) -> Path:
        runner.consolidate(optimizer)
        path = save_checkpoint(accelerator, output_dir, state, meta, cfg.keep_checkpoints)
        if accelerator.is_main_process:
            logger.info("checkpoint (%s): %s", reason, path)
        return path

    def run_eval(epoch_done: int) -> dict[str, Any]:
        runner.consolidate(optimizer)
        result = evaluate(lm, test_loader, accelerator, heads=cfg.eval_heads)
        state.last_top1 = result["top1"]
        if result["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = result["top1"], epoch_done
        metrics.log({"kind": "eval", "epoch": epoch_done, "step": state.global_step, **result,
                     "best_top1": state.best_top1})
        return result

    # ---- train ---------------------------------------------------------------------------------
    stopped_early = state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.global_step >= cfg.max_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_main_process,
                    desc=f"{cfg.model}/{lm.method_name}{runner.label}", dynamic_ncols=True)
    window: Optional[dict[str, torch.Tensor]] = None  # per-stage sums since the last train row
    window_t0 = time.perf_counter()
    while not stopped_early and state.epoch < cfg.epochs:
        epoch = state.epoch
        lm.train()
        if cfg.freeze_bn:
            freeze_batchnorm(lm)
        t_epoch = time.perf_counter()
        for x, y in runner.batches(epoch, state.step_in_epoch):
            optimizer.zero_grad(set_to_none=True)
            error: Optional[str] = None
            try:
                with accelerator.autocast():
                    sums = runner.step(x, y)
            except FloatingPointError as e:  # raised by the engine before any optimizer step
                error = str(e)
            error = runner.agree_on_error(error)
            if error is not None:
                msg = _non_finite_message(epoch, state.global_step, error, latest_checkpoint(output_dir))
                metrics.log({"kind": "error", "epoch": epoch, "step": state.global_step, "error": msg})
                progress.close()
                accelerator.end_training()
                raise NonFiniteLossError(msg)
            runner.sync_gradients(cfg.clip_grad)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            state.global_step += 1
            state.step_in_epoch += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=state.global_step)

            window = sums if window is None else {k: window[k] + v for k, v in sums.items()}
            progress.update(1)
            if state.global_step % cfg.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                # the one collective per logging window
                totals = accelerator.reduce(torch.cat([window[k] for k in WINDOW_KEYS]), reduction="sum")
                row = train_row(totals, epoch, state.global_step, lr_used, time.perf_counter() - window_t0)
                metrics.log(row)
                progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")
                window, window_t0 = None, time.perf_counter()
            if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < steps_per_epoch:
                last_checkpoint = save("steps")
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                stopped_early = True
                break
        state.train_time_s += time.perf_counter() - t_epoch
        last_checkpoint = close_epoch(cfg, state, epoch, steps_per_epoch, stopped_early, run_eval, save)
    progress.close()

    # ---- finish: final evaluation (if the last state was not evaluated) and export ---------------
    if state.last_top1 is None:
        run_eval(state.epoch)
        last_checkpoint = save("final")
    runner.consolidate(optimizer)
    export_dir = None
    if cfg.export:
        export_dir = output_dir / EXPORT_DIR
        if accelerator.is_main_process:
            export_trained(lm.backbone, lm.method_name, lm.method_config, export_dir, cfg, data, state)
        accelerator.wait_for_everyone()
    metrics.log({"kind": "summary", "epoch": state.epoch, "step": state.global_step, "top1": state.last_top1,
                 "best_top1": state.best_top1, "best_epoch": state.best_epoch, "train_time_s": state.train_time_s,
                 "complete": state.epoch >= cfg.epochs})
    runner.close()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, top1=state.last_top1, best_top1=state.best_top1,
                       global_step=state.global_step, epochs_completed=state.epoch, train_time_s=state.train_time_s,
                       export_dir=export_dir, last_checkpoint=last_checkpoint, metrics=list(metrics.rows))
