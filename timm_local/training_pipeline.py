"""``train(cfg)`` with ``--engine pipeline``: the training loop on :class:`~timm_local.engine.PipelineTrainer`.

The same run as :func:`timm_local.training.train` (same data, optimizer, schedule, metrics, checkpoints and
export, reusing its helpers), with the local stages cut into W pipeline segments over W*R processes
(docs/pipeline.md, "Wiring into tools/train.py"). Differences from the sequential loop:

* the training data is sharded by pipeline replica (R shards), read only by first-segment processes;
* no gradient averaging and no per-step collective in the loop: the engine averages gradients within
  replica groups and raises ``FloatingPointError`` on the process that sees a non-finite loss;
* diagnostics are summed per stage over a logging window and all-reduced once per window;
* ``trainer.consolidate(optimizer)`` before every evaluation, checkpoint and export, after which the
  model and optimizer on every process equal the sequential engine's, so that code runs unchanged
  (checkpoints resume under any engine, cut or W).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .config import TrainConfig
from .training import (CONFIG_NAME, EXPORT_DIR, METRICS_NAME, NonFiniteLossError, TrainResult,
                       _export, _freeze_bn, _make_accelerator, _Metrics, _resolve_resume, _save_checkpoint,
                       _scalar_config, _tracker_names, _yaml_safe, build_local_model, evaluate, latest_checkpoint,
                       _loader, close_epoch, eval_batch_size, prepare_optimization, resume_state, run_datasets,
                       run_meta)

__all__ = ["train_pipeline", "pipeline_layout"]

logger = logging.getLogger(__name__)


def pipeline_layout(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(W, R) for ``world`` processes, or a ValueError saying how to launch."""
    w = cfg.pipeline_segments or world
    if w < 1:
        raise ValueError(f"--pipeline-segments must be >= 1, got {w}")
    if world == 1:
        raise ValueError(
            f"--engine pipeline runs W={w} pipeline segments in W*R processes, but this is a single process: launch "
            f"`torchrun --nproc_per_node {max(w, 2)} tools/train.py --engine pipeline --pipeline-segments {max(w, 2)} "
            f"...` (or `accelerate launch --multi_gpu --num_processes ...`), or use --engine sequential in one process "
            f"(the same results)")
    if world % w:
        raise ValueError(f"--pipeline-segments {w} does not divide the {world} processes (world = W*R replicas)")
    r = world // w
    if cfg.batch_size % r:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must be divisible by the R={r} pipeline replicas")
    return w, r


def _train_loader(train_set: Any, cfg: TrainConfig, replica: int, replicas: int) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(train_set, num_replicas=replicas, rank=replica, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    return DataLoader(train_set, batch_size=cfg.batch_size // replicas, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=torch.Generator().manual_seed(cfg.seed))


def train_pipeline(cfg: TrainConfig) -> TrainResult:
    """:func:`timm_local.training.train` on the pipelined engine (every process of a W*R-process launch)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .engine import PipelineTrainer

    output_dir = cfg.resolved_output_dir()
    accelerator = _make_accelerator(cfg, output_dir)
    world = accelerator.num_processes
    num_segments, replicas = pipeline_layout(cfg, world)
    resume_from = _resolve_resume(cfg, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    # ---- data --------------------------------------------------------------------------------
    train_set, test_set, data = run_datasets(cfg)
    eval_bs = eval_batch_size(cfg, world)
    test_loader = accelerator.prepare(_loader(test_set, eval_bs, shuffle=False, drop_last=False, cfg=cfg))
    steps_per_epoch = len(train_set) // cfg.batch_size

    # ---- model, pipeline, optimizer, schedule ---------------------------------------------------
    lm = build_local_model(cfg, data).to(accelerator.device)
    trainer = PipelineTrainer(
        lm, num_segments, cut=cfg.pipeline_cut, cost_measure=cfg.pipeline_cost or "time",
        input_size=(data.in_chans, data.image_size, data.image_size), cost_batch_size=cfg.batch_size // replicas,
        device=accelerator.device)  # broadcasts process 0's weights
    train_loader = _train_loader(train_set, cfg, trainer.replica, replicas) if trainer.is_first else None
    optimizer, scheduler, state = prepare_optimization(cfg, lm, accelerator, steps_per_epoch)
    meta = run_meta(cfg, lm, data, world)
    if resume_from is not None:
        # full model and optimizer on every process (checkpoints are consolidated), so any cut/W/engine resumes
        resume_state(accelerator, resume_from, meta, state, steps_per_epoch)
    last_checkpoint = resume_from

    resolved = {**cfg.to_dict(), "output_dir": str(output_dir), "data": dataclasses.asdict(data),
                "method_config": lm.method_config,
                "runtime": {"num_processes": world, "steps_per_epoch": steps_per_epoch,
                            "total_steps": steps_per_epoch * cfg.epochs, "device": str(accelerator.device),
                            "per_process_batch": cfg.batch_size // replicas,
                            "pipeline": {"segments": num_segments, "replicas": replicas, "cut": list(trainer.cut)},
                            "resumed_from": str(resume_from) if resume_from else None}}
    if accelerator.is_main_process:
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(_yaml_safe(resolved), sort_keys=False))
    metrics = _Metrics(accelerator, output_dir / METRICS_NAME, state.global_step if resume_from else None)
    if _tracker_names(cfg.trackers):
        accelerator.init_trackers("timm_local", config=_scalar_config(cfg.to_dict()))

    owned = trainer.owned_parameters()
    n_stages = len(lm.stages)

    def save(reason: str) -> Path:
        trainer.consolidate(optimizer)
        path = _save_checkpoint(accelerator, output_dir, state, meta, cfg.keep_checkpoints)
        logger.info("checkpoint (%s): %s", reason, path)
        return path

    def run_eval(epoch_done: int) -> dict[str, Any]:
        trainer.consolidate(optimizer)
        result = evaluate(lm, test_loader, accelerator, heads=cfg.eval_heads)
        state.last_top1 = result["top1"]
        if result["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = result["top1"], epoch_done
        metrics.log({"kind": "eval", "epoch": epoch_done, "step": state.global_step, **result,
                     "best_top1": state.best_top1})
        return result

    def log_window(window: dict[str, torch.Tensor], epoch: int, lr_used: float, elapsed: float) -> None:
        agg = torch.cat([window[k] for k in ("loss_sum", "samples", "correct", "scored")])
        agg = accelerator.reduce(agg, reduction="sum")  # the one collective per logging window
        loss_sum, samples, correct, scored = agg.view(4, n_stages)
        losses = (loss_sum / samples.clamp(min=1)).tolist()
        acc = [100.0 * float(c) / float(s) for c, s in zip(correct, scored) if s > 0]
        row = {"kind": "train", "epoch": epoch, "step": state.global_step, "lr": lr_used, "loss": losses[-1],
               "local_losses": [round(v, 5) for v in losses], "train_top1": acc[-1],
               "head_train_top1": [round(a, 3) for a in acc[:-1]],
               "samples_per_s": float(samples[-1]) / max(elapsed, 1e-9)}
        metrics.log(row)
        progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")

    # ---- train ---------------------------------------------------------------------------------
    stopped_early = state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.global_step >= cfg.max_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc=f"{cfg.model}/{lm.method_name} pipeline W={num_segments} R={replicas}", dynamic_ncols=True)
    window: Optional[dict[str, torch.Tensor]] = None
    window_t0 = time.perf_counter()
    while not stopped_early and state.epoch < cfg.epochs:
        epoch = state.epoch
        lm.train()
        if cfg.freeze_bn:
            _freeze_bn(lm)
        loader = None
        if train_loader is not None:
            train_set.set_epoch(epoch)
            train_loader.sampler.set_epoch(epoch)
            # mid-epoch resume: the order is a function of (seed, epoch), so skipping re-reads the same batches
            loader = itertools.islice(train_loader, state.step_in_epoch, None)
        t_epoch = time.perf_counter()
        for x, y in trainer.iterate(loader, steps=steps_per_epoch - state.step_in_epoch):
            optimizer.zero_grad(set_to_none=True)
            try:
                with accelerator.autocast():
                    out = trainer.step(x, y, backward=accelerator.backward)
            except FloatingPointError as e:  # this process saw it; the launcher stops the others
                ckpt = latest_checkpoint(output_dir)
                msg = (f"Non-finite loss at epoch {epoch}, step {state.global_step} ({e}). Training stopped before "
                       f"the optimizer step. "
                       + (f"The last good checkpoint is {ckpt}; " if ckpt else "No checkpoint was written yet; ")
                       + "lower --lr, use --warmup-epochs or --mixed-precision no, check --mean/--std, then resume "
                         "with --resume auto.")
                metrics.log({"kind": "error", "epoch": epoch, "step": state.global_step, "error": msg})
                progress.close()
                raise NonFiniteLossError(msg) from e
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(owned, cfg.clip_grad)  # per segment (docs/pipeline.md, caveats)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            state.global_step += 1
            state.step_in_epoch += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=state.global_step)

            dense = out.dense(n_stages)
            window = dense if window is None else {k: window[k] + v for k, v in dense.items()}
            progress.update(1)
            if state.global_step % cfg.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                log_window(window, epoch, lr_used, time.perf_counter() - window_t0)
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

    # ---- finish ----------------------------------------------------------------------------------
    if state.last_top1 is None:
        run_eval(state.epoch)
        last_checkpoint = save("final")
    trainer.consolidate(optimizer)
    export_dir = None
    if cfg.export:
        export_dir = output_dir / EXPORT_DIR
        if accelerator.is_main_process:
            _export(lm.backbone, lm.method_name, lm.method_config, export_dir, cfg, data, state)
        accelerator.wait_for_everyone()
    metrics.log({"kind": "summary", "epoch": state.epoch, "step": state.global_step, "top1": state.last_top1,
                 "best_top1": state.best_top1, "best_epoch": state.best_epoch, "train_time_s": state.train_time_s,
                 "complete": state.epoch >= cfg.epochs})
    trainer.close()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, top1=state.last_top1, best_top1=state.best_top1,
                       global_step=state.global_step, epochs_completed=state.epoch, train_time_s=state.train_time_s,
                       export_dir=export_dir, last_checkpoint=last_checkpoint, metrics=list(metrics.rows))
