"""The pieces of a run, built from its config: accelerator, datasets and loaders, LocalModel, optimizer and schedule.

Why the accelerator is built this way, and why the model is not ``accelerator.prepare``-d (no DDP
wrapper): see :mod:`timm_local.training.runners`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig
from ..data import CorruptImageError, DataConfig, create_datasets
from ..distributed import check_gpus_per_node
from ..methods.base import method_hyperparameters
from .checkpoint import register_for_checkpointing
from .metrics import tracker_names
from .state import TrainState

__all__ = ["Schedule", "apply_speed_options", "augmentation_options", "build_backbone", "build_local_model",
           "check_precision", "device_batches", "eval_batch_size", "freeze_batchnorm", "has_accelerator",
           "make_accelerator", "make_loader", "method_kwargs", "normalize_on_device", "prepare_optimization",
           "run_datasets", "settled_by_accelerate", "timm_scheduler", "tune_convolutions"]

logger = logging.getLogger(__name__)


def has_accelerator() -> bool:
    """True where torch sees a GPU (or another accelerator)."""
    if hasattr(torch, "accelerator"):
        return bool(torch.accelerator.is_available())
    return torch.cuda.is_available()


def check_precision(cfg: TrainConfig) -> None:
    """fp16 needs a GPU: Accelerate would otherwise train fp32 while the run's config says fp16.

    Called with the precision Accelerate settled on (:func:`settled_by_accelerate`), so an fp16 that came
    from Accelerate's own configuration is refused as clearly as ``--mixed-precision fp16``.
    """
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not has_accelerator()):
        raise ConfigError("--mixed-precision fp16 needs a GPU (its gradient scaling is CUDA-only) and this run is on "
                          "the CPU; use --mixed-precision bf16 (works on CPUs) or no")


def make_accelerator(cfg: TrainConfig, output_dir: Path) -> Any:
    """Accelerate with the run's precision, trackers, global batch split and seedable data order.

    ``split_batches=True``: ``batch_size`` is the paper's (global) batch whatever the number of processes.
    The seedable sampler makes the data order a function of (seed, epoch), which exact resume needs.
    ``--collective-timeout`` becomes the process group's timeout: a dead or hung process (another node
    lost) stops the run with an error instead of a hang.

    Precision and gradient accumulation left at None are Accelerate's to decide (its config file through
    ``accelerate launch``, ``ACCELERATE_*`` variables); a value given is passed so that it wins. The
    accumulation goes in as a plugin because a plain ``gradient_accumulation_steps`` argument is itself
    overridden by ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``.
    """
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs,
                                  ProjectConfiguration)

    if not cfg.collective_timeout > 0:
        raise ValueError(f"--collective-timeout must be a positive number of seconds, got {cfg.collective_timeout}")

    trackers = tracker_names(cfg.trackers)
    # Accelerate only selects multi-process CPU (gloo) when told to use the CPU; a torchrun-style launch
    # (`accelerate launch --multi_gpu --num_processes N`, `torchrun`) on a machine without an accelerator
    # would otherwise start N independent single-process runs.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    cpu = cfg.cpu or (launched and not has_accelerator())
    if launched and not cpu and torch.cuda.is_available():
        check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    accumulation = (None if cfg.grad_accum_steps is None
                    else GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps))
    return Accelerator(
        cpu=cpu, gradient_accumulation_plugin=accumulation,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))],
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=torch.cuda.is_available() and not cpu),
        step_scheduler_with_optimizer=False,
    )


def settled_by_accelerate(cfg: TrainConfig, accelerator: Any) -> TrainConfig:
    """``cfg`` with the precision and gradient accumulation the accelerator uses: config.yaml, checkpoints
    and the start line then say what the run did, whoever decided it."""
    return dataclasses.replace(cfg, mixed_precision=str(accelerator.mixed_precision),
                               grad_accum_steps=int(accelerator.gradient_accumulation_steps))


def method_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The method's hyper-parameters: ``method_kwargs`` plus ``aux_depth`` / ``tau`` / ``local_modules`` /
    ``local_module_ends`` where it declares them.

    ``aux_depth`` and ``tau`` are top-level keys because they are the paper's; a recipe for AugLocal run
    with ``--method bp`` (the usual comparison) drops them with a warning instead of failing. What a
    method takes is read from its signature (:func:`~timm_local.methods.base.method_hyperparameters`).
    """
    kwargs = dict(cfg.method_kwargs or {})
    paper = {k: v for k, v in (("aux_depth", cfg.aux_depth), ("tau", cfg.tau), ("local_modules", cfg.local_modules),
                               ("local_module_ends", cfg.local_module_ends)) if v is not None}
    try:
        declared = method_hyperparameters(cfg.method)
    except ValueError as e:  # unknown method: the message lists the registered ones
        raise ConfigError(f"--method: {e}") from None
    unknown = sorted(set(kwargs) - set(declared))
    if unknown:
        raise ConfigError(f"--method-kwargs: method {cfg.method!r} takes no {unknown}; it takes "
                          f"{', '.join(sorted(declared)) or 'no hyper-parameters'}")
    dropped = [k for k in paper if k not in declared]
    if dropped:
        logger.warning("method %r takes no %s; ignoring them", cfg.method, " / ".join(dropped))
    return {**kwargs, **{k: v for k, v in paper.items() if k in declared}}


def build_backbone(cfg: TrainConfig, data: DataConfig) -> nn.Module:
    """The run's timm model (``cfg.model`` from timm's registry), sized for its data.

    The data's preprocessing goes into the model's ``pretrained_cfg`` (timm's ``pretrained_cfg_overlay``):
    methods that reconstruct the input (InfoPro) de-normalise with the statistics the data pipeline
    actually used, and the export carries them.

    ``--pretrained`` / ``--initial-checkpoint`` load their weights here (:mod:`.starting`); ``--drop-rate`` and
    ``--drop-path-rate`` are timm's ``drop_rate`` / ``drop_path_rate`` arguments.
    """
    from ..model import create_backbone
    from .starting import starting_weights

    start = starting_weights(cfg)
    kwargs = {k: v for k, v in (("drop_rate", cfg.drop_rate), ("drop_path_rate", cfg.drop_path_rate)) if v is not None}
    try:
        return create_backbone(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans,
                               pretrained=start.pretrained, pretrained_cfg_overlay={**data.pretrained_cfg(),
                                                                                    **start.overlay},
                               **{**kwargs, **dict(cfg.model_kwargs or {})})
    except (RuntimeError, OSError) as e:  # timm's and huggingface_hub's "no weights" / "not in the offline cache"
        if not start.pretrained:
            raise
        raise ConfigError(f"cannot load the starting weights ({start.source}): {e}") from e


def build_local_model(cfg: TrainConfig, data: DataConfig) -> Any:
    """The LocalModel of a run: the run's backbone with ``cfg.method``'s heads.

    A ValueError here (unknown model, a d or tau the model cannot take, ...) is about the run's choices, so it
    is a :class:`ConfigError`: one line from the tools, raised before the run writes anything.
    """
    from ..model import create_local_model

    kwargs = method_kwargs(cfg)
    try:
        return create_local_model(build_backbone(cfg, data), method=cfg.method, method_kwargs=kwargs,
                                  input_size=(data.in_chans, data.image_size, data.image_size))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def apply_speed_options(cfg: TrainConfig, lm: Any) -> None:
    """``--channels-last`` and ``--torchcompile`` on a built model, before the optimizer is created.

    Neither changes what is learnt (:mod:`timm_local.engine.speed`): parameter names and values stay,
    every local loss keeps its own backward.
    """
    from ..engine.speed import compile_blocks_and_heads, use_channels_last

    if cfg.channels_last:
        use_channels_last(lm)
    if cfg.torchcompile:
        count = compile_blocks_and_heads(lm, backend=cfg.torchcompile)
        logger.info("compiling %d blocks and heads with %s (the first steps compile)", count, cfg.torchcompile)


def normalize_on_device(cfg: TrainConfig, device: Any) -> bool:
    """Whether batches travel as uint8 and are normalised on ``device`` (:mod:`timm_local.data.device_loader`).

    On a GPU by default (``--device-normalize`` forces it either way): the workers' CPU time and the copy are
    what starve a GPU. On the CPU the workers normalising in parallel is the faster place. The results are
    bitwise the same either way.
    """
    if cfg.device_normalize is not None:
        return bool(cfg.device_normalize)
    return torch.device(device).type == "cuda"


def run_datasets(cfg: TrainConfig, normalize: bool = True) -> tuple[Any, Any, DataConfig]:
    """The train and test sets of a run, exactly as its config describes them (both engines, diagnostics);
    ``normalize=False``: uint8 images, for :func:`device_batches`."""
    try:
        train_set, test_set, data = create_datasets(
            cfg.dataset, cfg.data_dir, image_size=cfg.image_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
            augment=cfg.augment, seed=cfg.seed, mean=cfg.mean, std=cfg.std, image_column=cfg.image_column,
            label_column=cfg.label_column, model=cfg.model, model_kwargs=cfg.model_kwargs, normalize=normalize,
            streaming=cfg.streaming, batch_size=cfg.batch_size, workers=cfg.workers,
            augmentation=augmentation_options(cfg))
    except CorruptImageError:
        raise
    except ValueError as e:  # a dataset that does not fit the run's settings (classes, columns, layout)
        raise ConfigError(str(e)) from e
    if data.train_size < cfg.batch_size:
        raise ConfigError(f"the training set has {data.train_size} images, fewer than one batch ({cfg.batch_size}); "
                         f"lower --batch-size")
    return train_set, test_set, data


def augmentation_options(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe's ``timm.data.create_transform`` knobs, under create_transform's argument names."""
    return {"auto_augment": cfg.aa, "re_prob": cfg.reprob, "re_mode": cfg.remode, "re_count": cfg.recount,
            "color_jitter": cfg.color_jitter, "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}


def eval_batch_size(cfg: TrainConfig, world: int) -> int:
    """The global evaluation batch, rounded down to a multiple of the processes (at least one each)."""
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    return max(world, eval_bs - eval_bs % world)


def make_loader(dataset: Any, batch_size: int, cfg: TrainConfig, shuffle: bool = False, drop_last: bool = False,
                sampler: Optional[Any] = None) -> Any:
    """A DataLoader with its own generator: loader seeding never consumes the global RNG (resume stays exact).

    Workers persist across epochs (no re-spawn, no re-import each epoch) where the dataset's epoch reaches
    them: :class:`~timm_local.data.SeededTransformDataset` keeps it in shared memory.
    """
    from torch.utils.data import DataLoader

    persistent = cfg.workers > 0 and isinstance(getattr(dataset, "shared_epoch", None), torch.Tensor)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
        num_workers=cfg.workers, pin_memory=torch.cuda.is_available(), persistent_workers=persistent,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def device_batches(loader: Any, data: DataConfig, device: Any, on_device: bool, move: bool = False) -> Any:
    """``loader`` as the model takes it: unchanged when the workers normalise (and, ``move=False``, Accelerate
    places the batches), else uint8 batches copied asynchronously and, ``on_device``, normalised on ``device``
    (:class:`~timm_local.data.DeviceBatches`)."""
    if not (on_device or move):
        return loader
    from ..data import DeviceBatches

    return DeviceBatches(loader, data.mean, data.std, device, normalize=on_device)


def tune_convolutions(device: Any) -> None:
    """cuDNN's autotuner on a GPU: every training batch has the same shape (square crops, ``drop_last``), so
    the fastest convolution algorithms are searched once. Left off where the user asked for deterministic
    algorithms (the search may pick different ones run to run)."""
    if torch.device(device).type == "cuda" and not torch.are_deterministic_algorithms_enabled() \
            and not torch.backends.cudnn.deterministic:
        torch.backends.cudnn.benchmark = True


class Schedule:
    """The per-update learning-rate schedule: a timm scheduler (or none), restartable at a step.

    Checkpointed through the state_dict protocol as the timm scheduler's own state, plus the step it was
    restarted at (:func:`~timm_local.training.resume.restart_schedule`) when it was: absent means never.
    """

    START_KEY = "timm_local_start_step"

    def __init__(self, scheduler: Any, start_step: int = 0) -> None:
        self.scheduler = scheduler
        self.start_step = start_step

    def step_update(self, global_step: int) -> None:
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=global_step - self.start_step)

    def state_dict(self) -> dict[str, Any]:
        state = self.scheduler.state_dict() if self.scheduler is not None else {}
        return {**state, self.START_KEY: self.start_step} if self.start_step else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.start_step = int(state.pop(self.START_KEY, 0))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def timm_scheduler(cfg: TrainConfig, optimizer: Any, steps_per_epoch: int, epochs: float, warmup: float) -> Any:
    """timm's ``cfg.sched`` schedule over ``epochs`` after ``warmup`` epochs, stepped per update."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def prepare_optimization(cfg: TrainConfig, lm: Any, accelerator: Any, steps_per_epoch: int
                         ) -> tuple[Any, Schedule, TrainState]:
    """timm optimizer + per-step schedule (linear warm-up, then cosine), prepared and registered for
    checkpointing together with the model and the run state.

    One optimizer over primary and auxiliary parameters: the parameter sets of different local losses
    are disjoint, so one SGD over all of them performs exactly the per-block updates (docs/spec.md §2.7)
    while keeping one LR schedule, one grad scaler and one checkpoint.
    """
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(lm, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=cfg.filter_bias_and_bn)
    warmup = float(min(cfg.warmup_epochs, cfg.epochs / 2)) if cfg.warmup_epochs else 0.0
    if warmup != cfg.warmup_epochs:
        logger.warning("warmup_epochs=%s >= half of epochs=%s: using %s", cfg.warmup_epochs, cfg.epochs, warmup)
    schedule = Schedule(timm_scheduler(cfg, optimizer, steps_per_epoch, cfg.epochs - warmup, warmup))
    optimizer = accelerator.prepare(optimizer)
    register_for_checkpointing(accelerator, lm, optimizer, schedule)
    return optimizer, schedule, TrainState()


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm on running statistics (``--freeze-bn``): updates then do not depend on the batch split."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
