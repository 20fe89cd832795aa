"""The training loop: Accelerate, local steps, evaluation, atomic checkpoints, resume, export.

Read top to bottom, :func:`train` is an ordinary Accelerate script (accelerate's
``complete_cv_example.py`` shape) with four deliberate differences, each forced by local learning:

1. **No DDP wrapper.** DDP all-reduces inside ``backward`` and expects one backward per step; a
   local step calls ``backward`` once per local loss, freeing each block's graph as it goes (that is
   the memory saving). So the model is *not* passed to ``accelerator.prepare``; instead
   :func:`average_gradients` all-reduces the accumulated gradients once, after the local step and
   before ``optimizer.step()``, and divides by the world size -- exactly DDP's arithmetic (DDP
   averages too), so N processes on batch/N give the update of one process on the full batch.
   Parameters are broadcast from process 0 at the start, as DDP does.
2. **Global batch split across processes** (``split_batches=True``): ``batch_size`` is the paper's
   batch, whatever the number of processes.
3. **One optimizer for primary and auxiliary parameters.** The parameter sets of different local
   losses are disjoint, so one SGD over all of them performs exactly the per-block updates
   (AUGLOCAL.md §2.7) while keeping one LR schedule, one grad scaler and one checkpoint.
4. **The LocalModel, the timm scheduler and the loop position** are registered with
   ``accelerator.register_for_checkpointing`` so that ``save_state`` / ``load_state`` carry them with
   the optimizer, the scaler, the sampler and every process's RNG states.

Checkpoints are written to a temporary folder and renamed into place, so a kill at any moment
leaves the previous complete checkpoint loadable; ``--resume auto`` picks the newest complete one.
Data order is a function of (seed, epoch) (Accelerate's seedable sampler) and augmentation of
(seed, epoch, index) (:class:`timm_local.data.SeededTransformDataset`), so a resumed run sees the
same batches -- also when resumed mid-epoch, where the consumed batches are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import yaml

from .config import TrainConfig
from .data import DataConfig, create_datasets

__all__ = [
    "TrainResult",
    "TrainState",
    "NonFiniteLossError",
    "CheckpointMismatchError",
    "train",
    "average_gradients",
    "broadcast_module",
    "list_checkpoints",
    "latest_checkpoint",
    "read_checkpoint_meta",
    "export_run",
    "read_run",
    "load_local_model",
    "SavedRun",
    "read_metrics",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META_NAME = "checkpoint_meta.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
EXPORT_DIR = "export"
# order of accelerator.register_for_checkpointing -> custom_checkpoint_{i}.pkl
CUSTOM_OBJECTS = ("model", "scheduler", "train_state")


class NonFiniteLossError(RuntimeError):
    """A local loss became NaN/inf. The run stopped without stepping; the last good checkpoint is kept."""


class CheckpointMismatchError(ValueError):
    """Refusal to resume from a checkpoint of a different model, method or classifier."""


@dataclass
class TrainState:
    """Loop position and best result; saved with every checkpoint (registered with Accelerate)."""

    epoch: int = 0  # current epoch (0-based); == epochs when training is complete
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    last_top1: Optional[float] = None
    train_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class TrainResult:
    """What :func:`train` returns (also summarised in the last ``metrics.jsonl`` row)."""

    output_dir: Path
    top1: Optional[float]
    best_top1: Optional[float]
    global_step: int
    epochs_completed: int
    train_time_s: float
    export_dir: Optional[Path]
    last_checkpoint: Optional[Path]
    metrics: list[dict[str, Any]] = field(default_factory=list)


class _SchedulerState:
    """Adapter giving a timm scheduler (or None) the state_dict protocol Accelerate checkpoints."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Data-parallel helpers
# ------------------------------------------------------------------------------------------------
def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter], num_processes: Optional[int] = None,
                      bucket_mb: float = 25.0) -> None:
    """All-reduce and average ``.grad`` across processes, in flattened buckets, as DDP does.

    Called once per step after every local backward has run, so each block's graph was already freed;
    the communication volume equals DDP's (one all-reduce of every gradient). Parameters without a
    gradient are skipped -- every process runs the same local step, so they are the same everywhere.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world = num_processes or torch.distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for bucket in _buckets(grads, int(bucket_mb * 2**20)):
        flat = torch._utils._flatten_dense_tensors(bucket)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        for g, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy process ``src``'s parameters and buffers to every process (DDP's start-up broadcast)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    for bucket in _buckets(tensors, 25 * 2**20):
        flat = torch._utils._flatten_dense_tensors([t.data for t in bucket])
        torch.distributed.broadcast(flat, src)
        for t, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, [t.data for t in bucket])):
            t.data.copy_(synced)


def _freeze_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
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
    path = Path(checkpoint) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete timm_local checkpoint (no {META_NAME})")
    return json.loads(path.read_text())


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, meta: dict[str, Any], keep: int) -> Path:
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


def _check_compatible(meta: dict[str, Any], expected: dict[str, Any], checkpoint: Path) -> None:
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


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
class _Metrics:
    """Append-only ``metrics.jsonl`` (main process) mirrored to the Accelerate trackers."""

    def __init__(self, accelerator: Any, path: Path, resume_step: Optional[int]) -> None:
        self.accelerator = accelerator
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if accelerator.is_main_process and path.exists():
            rows = read_metrics(path.parent)
            if resume_step is not None:
                # rows written after the checkpoint belong to work that is being redone
                rows = [r for r in rows if r.get("step", 0) <= resume_step and r.get("kind") != "summary"]
            else:
                rows = []
            self.rows = rows
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        row = {k: v for k, v in row.items() if v is not None}
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        scalars: dict[str, float] = {}
        kind = row.get("kind", "train")
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                scalars[f"{kind}/{k}"] = float(v)
            elif isinstance(v, list):
                for i, vi in enumerate(v):
                    if isinstance(vi, (int, float)):
                        scalars[f"{kind}/{k}_{i}"] = float(vi)
        if scalars:
            self.accelerator.log(scalars, step=int(row.get("step", 0)))


def read_metrics(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``kind`` = train | eval | summary)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_NAME} in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(lm: Any, loader: Any, accelerator: Any, heads: bool = True) -> dict[str, Any]:
    """Top-1 of the backbone alone on ``loader`` (+ per-auxiliary-head top-1 as a diagnostic).

    The per-head pass reuses ``local_step`` with a no-op backward under ``no_grad``, so the heads see
    exactly the features they see in training (eval-mode BatchNorm).
    """
    was_training = lm.training
    lm.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    head_correct: Optional[torch.Tensor] = None
    total = 0
    loss_sum = 0.0
    for x, y in loader:
        with accelerator.autocast():
            logits = lm(x)
        hits = (logits.argmax(dim=1) == y)
        losses = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        columns = [hits.float(), losses]
        if heads and len(lm.heads) > 0:
            with accelerator.autocast():
                out = lm.local_step(x, y, backward=lambda loss: None)
            columns += [(h.argmax(dim=1) == y).float() for h in out.head_logits if h is not None]
        table = accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        total += table.shape[0]
        correct += table[:, 0].sum().double()
        loss_sum += float(table[:, 1].sum())
        if table.shape[1] > 2:
            h = table[:, 2:].sum(dim=0).double()
            head_correct = h if head_correct is None else head_correct + h
    lm.train(was_training)
    result: dict[str, Any] = {"top1": 100.0 * float(correct) / max(total, 1), "loss": loss_sum / max(total, 1),
                              "samples": total}
    if head_correct is not None:
        result["head_top1"] = [round(100.0 * float(c) / total, 3) for c in head_correct]
    return result


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _tracker_names(spec: str) -> list[str]:
    if spec in ("none", "", None):
        return []
    if spec == "auto":
        try:
            import tensorboard  # noqa: F401

            return ["tensorboard"]
        except ImportError:
            try:
                import tensorboardX  # noqa: F401

                return ["tensorboard"]
            except ImportError:
                return []
    return [s.strip() for s in spec.split(",") if s.strip()]


def _scalar_config(d: dict[str, Any]) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) accept scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def _make_accelerator(cfg: TrainConfig, output_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    trackers = _tracker_names(cfg.trackers)
    # Accelerate only selects multi-process CPU (gloo) when told to use the CPU; a torchrun-style launch
    # (`accelerate launch --multi_gpu --num_processes N`, `torchrun`) on a machine without an accelerator
    # would otherwise start N independent single-process runs.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    cpu = cfg.cpu or (launched and not _has_accelerator())
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
    )


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return bool(torch.accelerator.is_available())
    return torch.cuda.is_available()


def _method_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The method's hyper-parameters: ``method_kwargs`` plus ``aux_depth`` / ``tau`` where it takes them.

    ``aux_depth`` and ``tau`` are top-level keys because they are the paper's; a recipe for AugLocal run
    with ``--method bp`` (the usual comparison) drops them with a warning instead of failing.
    """
    import timm_local

    kwargs = dict(cfg.method_kwargs or {})
    paper = {k: v for k, v in (("aux_depth", cfg.aux_depth), ("tau", cfg.tau)) if v is not None}
    if paper:
        try:
            timm_local.create_method(cfg.method, **kwargs, **paper)
        except TypeError:
            timm_local.create_method(cfg.method, **kwargs)  # still raises if method_kwargs are wrong
            logger.warning("method %r takes no %s; ignoring them", cfg.method, " / ".join(paper))
            return kwargs
    return {**kwargs, **paper}


def build_local_model(cfg: TrainConfig, data: DataConfig) -> Any:
    """The LocalModel of a run: ``cfg.model`` from timm's registry with ``cfg.method``'s heads."""
    import timm_local

    method_kwargs = _method_kwargs(cfg)
    if "mean" not in method_kwargs and "std" not in method_kwargs:
        # methods that reconstruct the input (InfoPro) must de-normalise with the statistics the data
        # pipeline actually used, not the architecture's default pretrained_cfg ones
        try:
            timm_local.create_method(cfg.method, **method_kwargs, mean=data.mean, std=data.std)
        except TypeError:
            pass  # the method does not take mean/std
        else:
            method_kwargs.update(mean=list(data.mean), std=list(data.std))
    return timm_local.create_local_model(
        cfg.model, method=cfg.method, method_kwargs=method_kwargs,
        input_size=(data.in_chans, data.image_size, data.image_size),
        num_classes=data.num_classes, in_chans=data.in_chans, **dict(cfg.model_kwargs or {}),
    )


def run_datasets(cfg: TrainConfig) -> tuple[Any, Any, DataConfig]:
    """The train and test sets of a run, exactly as its config describes them (both engines, diagnostics)."""
    train_set, test_set, data = create_datasets(
        cfg.dataset, cfg.data_dir, image_size=cfg.image_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        augment=cfg.augment, seed=cfg.seed, mean=cfg.mean, std=cfg.std, image_column=cfg.image_column,
        label_column=cfg.label_column)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch ({cfg.batch_size}); "
                         f"lower --batch-size")
    return train_set, test_set, data


def eval_batch_size(cfg: TrainConfig, world: int) -> int:
    """The global evaluation batch, rounded down to a multiple of the processes (at least one each)."""
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    return max(world, eval_bs - eval_bs % world)


def _loader(dataset: Any, batch_size: int, shuffle: bool, drop_last: bool, cfg: TrainConfig) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        # own generator: loader seeding never consumes the global RNG (model RNG stays resume-exact)
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _resolve_resume(cfg: TrainConfig, output_dir: Path) -> Optional[Path]:
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


def prepare_optimization(cfg: TrainConfig, lm: Any, accelerator: Any, steps_per_epoch: int
                         ) -> tuple[Any, Any, "TrainState"]:
    """timm optimizer + per-step schedule (linear warm-up, then cosine), prepared and registered for
    checkpointing together with the model and the run state (order = CUSTOM_OBJECTS)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(lm, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=cfg.filter_bias_and_bn)
    warmup = float(min(cfg.warmup_epochs, cfg.epochs / 2)) if cfg.warmup_epochs else 0.0
    if warmup != cfg.warmup_epochs:
        logger.warning("warmup_epochs=%s >= half of epochs=%s: using %s", cfg.warmup_epochs, cfg.epochs, warmup)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs - warmup, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    optimizer = accelerator.prepare(optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(lm, _SchedulerState(scheduler), state)
    return optimizer, scheduler, state


def run_meta(cfg: TrainConfig, lm: Any, data: DataConfig, world: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (checked by ``_check_compatible``)."""
    return {
        "model": cfg.model, "method": lm.method_name, "method_config": lm.method_config,
        "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size,
        "dataset": data.dataset, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "lr": cfg.lr,
        "num_processes": world, "custom_objects": list(CUSTOM_OBJECTS),
    }


def resume_state(accelerator: Any, checkpoint: Path, meta: dict[str, Any], state: "TrainState",
                 steps_per_epoch: int) -> None:
    """Refuse an incompatible checkpoint, then restore model, optimizer, schedule, RNG and position."""
    _check_compatible(read_checkpoint_meta(checkpoint), meta, checkpoint)
    accelerator.load_state(str(checkpoint))
    if state.step_in_epoch >= steps_per_epoch:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    logger.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch, state.global_step)


def close_epoch(cfg: TrainConfig, state: "TrainState", epoch: int, steps_per_epoch: int, stopped_early: bool,
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


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg`` (single process, or every process of an ``accelerate launch``) and export the backbone."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if cfg.engine == "pipeline":  # the same run with the local stages pipelined across processes
        from .training_pipeline import train_pipeline

        return train_pipeline(cfg)
    if cfg.engine != "sequential":
        raise ValueError(f"--engine must be sequential or pipeline, got {cfg.engine!r}")
    output_dir = cfg.resolved_output_dir()
    accelerator = _make_accelerator(cfg, output_dir)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must be divisible by the {world} processes")
    resume_from = _resolve_resume(cfg, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    # ---- data --------------------------------------------------------------------------------
    train_set, test_set, data = run_datasets(cfg)
    eval_bs = eval_batch_size(cfg, world)
    train_loader = _loader(train_set, cfg.batch_size, shuffle=True, drop_last=True, cfg=cfg)
    test_loader = _loader(test_set, eval_bs, shuffle=False, drop_last=False, cfg=cfg)
    train_loader, test_loader = accelerator.prepare(train_loader, test_loader)
    steps_per_epoch = len(train_loader)

    # ---- model, optimizer, schedule ------------------------------------------------------------
    lm = build_local_model(cfg, data).to(accelerator.device)
    broadcast_module(lm)
    optimizer, scheduler, state = prepare_optimization(cfg, lm, accelerator, steps_per_epoch)
    meta = run_meta(cfg, lm, data, world)
    if resume_from is not None:
        resume_state(accelerator, resume_from, meta, state, steps_per_epoch)
    last_checkpoint = resume_from

    resolved = {**cfg.to_dict(), "output_dir": str(output_dir), "data": dataclasses.asdict(data),
                "method_config": lm.method_config,
                "runtime": {"num_processes": world, "steps_per_epoch": steps_per_epoch,
                            "total_steps": steps_per_epoch * cfg.epochs, "device": str(accelerator.device),
                            "per_process_batch": cfg.batch_size // world,
                            "resumed_from": str(resume_from) if resume_from else None}}
    if accelerator.is_main_process:
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(_yaml_safe(resolved), sort_keys=False))
    metrics = _Metrics(accelerator, output_dir / METRICS_NAME, state.global_step if resume_from else None)
    if _tracker_names(cfg.trackers):
        accelerator.init_trackers("timm_local", config=_scalar_config(cfg.to_dict()))

    params = [p for p in lm.parameters() if p.requires_grad]

    def save(reason: str) -> Path:
        path = _save_checkpoint(accelerator, output_dir, state, meta, cfg.keep_checkpoints)
        logger.info("checkpoint (%s): %s", reason, path)
        return path

    def run_eval(epoch_done: int) -> dict[str, Any]:
        result = evaluate(lm, test_loader, accelerator, heads=cfg.eval_heads)
        state.last_top1 = result["top1"]
        if result["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = result["top1"], epoch_done
        metrics.log({"kind": "eval", "epoch": epoch_done, "step": state.global_step, **result,
                     "best_top1": state.best_top1})
        return result

    # ---- train ---------------------------------------------------------------------------------
    stopped_early = state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.global_step >= cfg.max_steps)
    window_losses: Optional[torch.Tensor] = None
    window_hits: Optional[torch.Tensor] = None  # correct predictions per head with logits, + the network
    window_steps, window_samples, window_t0 = 0, 0, time.perf_counter()
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc=f"{cfg.model}/{lm.method_name}", dynamic_ncols=True)
    while not stopped_early and state.epoch < cfg.epochs:
        epoch = state.epoch
        lm.train()
        if cfg.freeze_bn:
            _freeze_bn(lm)
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state.step_in_epoch > 0:
            loader = accelerator.skip_first_batches(train_loader, state.step_in_epoch)
            loader.set_epoch(epoch)
        t_epoch = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            error: Optional[str] = None
            try:
                with accelerator.autocast():
                    out = lm.local_step(x, y, backward=accelerator.backward)
                losses = torch.stack([l.float() for l in out.losses])
                if not torch.isfinite(losses).all():
                    error = f"local losses {losses.tolist()}"
            except FloatingPointError as e:  # raised by the engine before back-propagating a bad loss
                error, losses = str(e), None
            status = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
            if world > 1:
                status = accelerator.reduce(status, reduction="sum")
            if status.item() > 0:
                ckpt = latest_checkpoint(output_dir)
                msg = (f"Non-finite loss at epoch {epoch}, step {state.global_step} "
                       f"({error or 'on another process'}). Training stopped before the optimizer step. "
                       + (f"The last good checkpoint is {ckpt}; " if ckpt else "No checkpoint was written yet; ")
                       + "lower --lr, use --warmup-epochs or --mixed-precision no, check --mean/--std, then resume "
                         "with --resume auto.")
                metrics.log({"kind": "error", "epoch": epoch, "step": state.global_step, "error": msg})
                progress.close()
                accelerator.end_training()
                raise NonFiniteLossError(msg)
            average_gradients(params, world)
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(params, cfg.clip_grad)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            state.global_step += 1
            state.step_in_epoch += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=state.global_step)

            # diagnostics: per-stage losses, training accuracy of each head and of the network
            window_losses = losses if window_losses is None else window_losses + losses
            hits = [(h.argmax(1) == y).sum() for h in out.head_logits if h is not None]
            hits.append((out.logits.argmax(1) == y).sum())
            hits_t = torch.stack(hits).double()
            window_hits = hits_t if window_hits is None else window_hits + hits_t
            window_steps += 1
            window_samples += y.shape[0]
            progress.update(1)
            if state.global_step % cfg.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                agg = torch.cat([window_losses.double() / window_steps, window_hits,
                                 torch.tensor([window_samples], dtype=torch.float64, device=accelerator.device)])
                if world > 1:
                    agg = accelerator.reduce(agg, reduction="sum")
                    agg[: len(window_losses)] /= world
                n_loss = len(window_losses)
                samples = float(agg[-1])
                acc = (100.0 * agg[n_loss:-1] / samples).tolist()
                elapsed = time.perf_counter() - window_t0
                row = {"kind": "train", "epoch": epoch, "step": state.global_step,
                       "lr": lr_used, "loss": float(agg[n_loss - 1]),
                       "local_losses": [round(float(v), 5) for v in agg[:n_loss]],
                       "train_top1": acc[-1], "head_train_top1": [round(a, 3) for a in acc[:-1]],
                       "samples_per_s": samples / max(elapsed, 1e-9)}
                metrics.log(row)
                progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")
                window_losses, window_hits, window_steps, window_samples = None, None, 0, 0
                window_t0 = time.perf_counter()
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
    export_dir = None
    if cfg.export:
        export_dir = output_dir / EXPORT_DIR
        if accelerator.is_main_process:
            _export(lm.backbone, lm.method_name, lm.method_config, export_dir, cfg, data, state)
        accelerator.wait_for_everyone()
    metrics.log({"kind": "summary", "epoch": state.epoch, "step": state.global_step, "top1": state.last_top1,
                 "best_top1": state.best_top1, "best_epoch": state.best_epoch, "train_time_s": state.train_time_s,
                 "complete": state.epoch >= cfg.epochs})
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, top1=state.last_top1, best_top1=state.best_top1,
                       global_step=state.global_step, epochs_completed=state.epoch, train_time_s=state.train_time_s,
                       export_dir=export_dir, last_checkpoint=last_checkpoint, metrics=list(metrics.rows))


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _export_metadata(cfg: TrainConfig, data: DataConfig, state: TrainState, method_name: str,
                     method_config: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    return {
        "method": method_name, "method_config": method_config, **method_config,
        "dataset": data.dataset, "model": cfg.model, "image_size": data.image_size,
        "top1": state.last_top1, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
        "epochs": state.epoch, "global_step": state.global_step, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "seed": cfg.seed, "timm_local_version": __version__,
    }


def _export(backbone: nn.Module, method_name: str, method_config: dict[str, Any], export_dir: Path,
            cfg: TrainConfig, data: DataConfig, state: TrainState) -> Path:
    from .export import export_backbone

    return export_backbone(
        backbone, export_dir, data_config=data.pretrained_cfg(),
        metadata=_export_metadata(cfg, data, state, method_name, method_config), label_names=data.classes)


@dataclass
class SavedRun:
    """What a run folder holds for one checkpoint: its resolved config, data description and model state."""

    run_dir: Path
    checkpoint: Path
    cfg: TrainConfig
    data: DataConfig
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]  # the whole LocalModel: "backbone.*" and the auxiliary heads


def read_run(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None) -> SavedRun:
    """Read a run's ``config.yaml`` and one checkpoint (the latest complete one by default)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no {CONFIG_NAME})")
    resolved = yaml.safe_load(config_path.read_text())
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {CHECKPOINT_DIR}/")
    meta = read_checkpoint_meta(ckpt)
    index = meta.get("custom_objects", list(CUSTOM_OBJECTS)).index("model")
    model_state = torch.load(ckpt / f"custom_checkpoint_{index}.pkl", map_location="cpu", weights_only=True)
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in resolved.items() if k in field_names})
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in resolved["data"].items() if k in data_fields})
    data.mean, data.std = tuple(data.mean), tuple(data.std)
    return SavedRun(run_dir, ckpt, cfg, data, meta, model_state)


def load_local_model(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None) -> tuple[Any, SavedRun]:
    """A run's whole LocalModel -- backbone *and* auxiliary heads -- as trained, for diagnostics on the heads.

    An export keeps only the backbone (that is what inference needs); this is for questions about the
    local objectives themselves, e.g. how well each block's head classifies (benchmarks/head_accuracy.py).
    """
    run = read_run(run_dir, checkpoint)
    lm = build_local_model(run.cfg, run.data)
    lm.load_state_dict(run.model_state)
    return lm, run


def export_run(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
               export_dir: Optional[Union[str, Path]] = None) -> Path:
    """Export the backbone of a run's checkpoint (latest by default) to ``RUN_DIR/export``.

    Rebuilds only the timm backbone from the run's ``config.yaml`` and loads the ``backbone.*`` part of
    the checkpointed LocalModel state -- the auxiliary heads are not part of an export.
    """
    import timm

    import timm_local  # noqa: F401  (our architectures in timm's registry)

    run = read_run(run_dir, checkpoint)
    cfg, data = run.cfg, run.data
    backbone_state = {k[len("backbone."):]: v for k, v in run.model_state.items() if k.startswith("backbone.")}
    backbone = timm.create_model(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans,
                                 **dict(cfg.model_kwargs or {}))
    backbone.load_state_dict(backbone_state)
    state = TrainState()
    state.load_state_dict(run.meta.get("train_state", {}))
    return _export(backbone, run.meta["method"], run.meta.get("method_config", {}),
                   Path(export_dir) if export_dir else run.run_dir / EXPORT_DIR, cfg, data, state)
