"""Runners: how an engine takes part in the one training loop (:func:`timm_local.training.loop.fit`).

The loop owns everything a run does once (set-up, resume, epochs, evaluation, checkpoints, NaN handling,
export, metrics); a runner owns what differs between engines: where the training batches come from,
one local step, gradient synchronisation, and making the model whole again before evaluation,
checkpoints and export. Both runners leave the model and optimizer in the same state after a step, so
checkpoints resume under either engine.

Why no DDP wrapper: DDP all-reduces inside ``backward`` and expects one backward per step; a local step
calls ``backward`` once per local loss, freeing each block's graph as it goes (that is the memory
saving). So the model is never passed to ``accelerator.prepare``; gradients are averaged with DDP's
arithmetic by :mod:`timm_local.distributed` instead, and parameters start from process 0's, as DDP does.
"""
from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional, Protocol

import torch
from torch.utils.data import IterableDataset

from ..config import ConfigError, TrainConfig
from ..data import DataConfig
from ..distributed import average_gradients
from .builders import apply_speed_options, device_batches, make_loader, normalize_on_device
from .checkpoint import any_process
from .samplers import ResumableDistributedSampler

__all__ = ["PipelineRunner", "RUNNERS", "Runner", "SequentialRunner", "make_runner", "micro_batch_groups",
           "pipeline_layout", "stream_batches"]


class Runner(Protocol):
    """What :func:`~timm_local.training.loop.fit` needs from an engine."""

    label: str  # shown after the model/method on the progress bar
    steps_per_epoch: int
    per_process_batch: int
    errors_agreed: bool  # every process learns of another's non-finite loss (else only the one that saw it)

    def check_launch(self, world_size: int, accum: int = 1) -> None:
        """Refuse a launch this engine cannot run (before anything is written); ``accum`` micro-batches make
        one optimizer step."""

    def attach(self, accelerator: Any, lm: Any, train_set: Any, data: DataConfig) -> None:
        """Take the built model and training set (collectives: every process calls it)."""

    def runtime(self) -> dict[str, Any]:
        """Facts about the run's layout for ``config.yaml``'s ``runtime`` section."""

    def batches(self, epoch: int, skip: int) -> Iterable[list[tuple[Any, Any]]]:
        """The ``accum`` micro-batches ``(x, y)`` of each remaining optimizer step of ``epoch`` after ``skip``
        steps (mid-epoch resume)."""

    def step(self, x: Any, y: Any, sync: bool = True) -> dict[str, torch.Tensor]:
        """One local step on a micro-batch (forward and per-stage backward, gradients added to those already
        there); per-stage sums (:func:`~timm_local.engine.stage_sums`). ``sync``: the last micro-batch of an
        optimizer step, after which an engine that averages during the step may do so.

        Raises ``FloatingPointError`` before any optimizer step when a local loss is not finite.
        """

    def agree_on_error(self, error: Optional[str]) -> Optional[str]:
        """The error that stops every process, if this or (where it can know) another process had one."""

    def sync_gradients(self, clip_grad: Optional[float]) -> None:
        """Make gradients final for ``optimizer.step()``: averaged over replicas, optionally clipped."""

    def consolidate(self, optimizer: Any) -> None:
        """Collective: every process's model and optimizer hold the complete trained state."""

    def close(self) -> None:
        """Release the engine (flush pending communication)."""


class SequentialRunner:
    """Every process runs the whole local step on its share of the global batch (data parallel)."""

    label = ""
    errors_agreed = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def check_launch(self, world_size: int, accum: int = 1) -> None:
        if self.cfg.batch_size % (world_size * accum):
            raise ConfigError(f"batch_size={self.cfg.batch_size} (global, per optimizer step) must be divisible by "
                             f"the {world_size} processes x {accum} gradient accumulation steps")
        self.world, self.accum = world_size, accum
        self.per_process_batch = self.cfg.batch_size // (world_size * accum)

    def attach(self, accelerator: Any, lm: Any, train_set: Any, data: DataConfig) -> None:
        from accelerate.utils import broadcast

        self.accelerator, self.lm, self.train_set, self.data = accelerator, lm, train_set, data
        self.on_device = normalize_on_device(self.cfg, accelerator.device)
        self.stream = isinstance(train_set, IterableDataset)
        if self.stream:  # the stream shards itself over processes and workers: each reads its own batches
            self.loader = make_loader(train_set, self.per_process_batch, self.cfg)
            self.steps_per_epoch = train_set.num_samples // self.cfg.batch_size
        else:
            loader = make_loader(train_set, self.cfg.batch_size // self.accum, self.cfg, shuffle=True,
                                 drop_last=True)
            self.loader = accelerator.prepare(loader)  # shards the global batch (split_batches)
            self.steps_per_epoch = len(self.loader) // self.accum
        broadcast(list(lm.state_dict().values()), from_process=0)  # DDP's start-up broadcast
        apply_speed_options(self.cfg, lm)  # after the broadcast: it sends contiguous tensors only
        self.params = [p for p in lm.parameters() if p.requires_grad]

    def runtime(self) -> dict[str, Any]:
        return {}

    def batches(self, epoch: int, skip: int) -> Iterable[list[tuple[Any, Any]]]:
        self.train_set.set_epoch(epoch)
        if self.stream:
            loader = device_batches(self.loader, self.data, self.accelerator.device, self.on_device, move=True)
            return micro_batch_groups(stream_batches(loader, self.steps_per_epoch * self.accum, skip * self.accum),
                                      self.accum, self.steps_per_epoch - skip)
        self.loader.set_epoch(epoch)
        loader = self.loader
        if skip:  # at the batch-sampler level: the skipped batches are never read or decoded
            loader = self.accelerator.skip_first_batches(self.loader, skip * self.accum)
            loader.set_epoch(epoch)
        loader = device_batches(loader, self.data, self.accelerator.device, self.on_device)
        return micro_batch_groups(loader, self.accum, self.steps_per_epoch - skip)

    def step(self, x: Any, y: Any, sync: bool = True) -> dict[str, torch.Tensor]:
        # accelerator.backward divides every local loss by the accumulation steps: N summed micro-batch
        # gradients are the mean over the whole batch, as in one step on it
        return self.lm.local_step(x, y, backward=self.accelerator.backward).sums(y)

    def agree_on_error(self, error: Optional[str]) -> Optional[str]:
        if any_process(self.accelerator, error is not None):
            return error or "on another process"
        return None

    def sync_gradients(self, clip_grad: Optional[float]) -> None:
        average_gradients(self.params, self.world)
        if clip_grad:
            self.accelerator.clip_grad_norm_(self.params, clip_grad)

    def consolidate(self, optimizer: Any) -> None:
        pass  # every process holds the whole model already

    def close(self) -> None:
        pass


def pipeline_layout(cfg: TrainConfig, world: int, accum: int = 1) -> tuple[int, int]:
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
    if cfg.batch_size % (r * accum):
        raise ConfigError(f"batch_size={cfg.batch_size} (global, per optimizer step) must be divisible by the R={r} "
                         f"pipeline replicas x {accum} gradient accumulation steps")
    return w, r


class PipelineRunner:
    """The local stages cut into W segments over W×R processes (:class:`~timm_local.engine.PipelineTrainer`).

    The training data is sharded by pipeline replica (R shards) and read only by first-segment processes;
    the engine averages gradients within replica groups; ``consolidate`` makes every process's model and
    optimizer equal the sequential engine's before evaluation, checkpoints and export.
    """

    errors_agreed = False  # no per-step collective (it would stall the pipeline): the launcher stops the rest

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def check_launch(self, world_size: int, accum: int = 1) -> None:
        self.segments, self.replicas = pipeline_layout(self.cfg, world_size, accum)
        self.accum = accum
        self.per_process_batch = self.cfg.batch_size // (self.replicas * accum)
        self.label = f" pipeline W={self.segments} R={self.replicas}"

    def attach(self, accelerator: Any, lm: Any, train_set: Any, data: DataConfig) -> None:
        from ..engine import PipelineTrainer

        self.accelerator, self.lm, self.train_set, self.data = accelerator, lm, train_set, data
        self.on_device = normalize_on_device(self.cfg, accelerator.device)
        if isinstance(train_set, IterableDataset):
            raise ValueError("--engine pipeline reads map-style datasets (its replicas share one sampler order); "
                             "train a stream (wds/, hfids/, --streaming) with --engine sequential")
        apply_speed_options(self.cfg, lm)
        self.steps_per_epoch = len(train_set) // self.cfg.batch_size
        self.trainer = PipelineTrainer(
            lm, self.segments, cut=self.cfg.pipeline_cut, cost_measure=self.cfg.pipeline_cost or "time",
            input_size=(data.in_chans, data.image_size, data.image_size), cost_batch_size=self.per_process_batch,
            device=accelerator.device,  # broadcasts process 0's weights
            timeout=timedelta(seconds=self.cfg.collective_timeout))
        self.loader = None
        if self.trainer.is_first:
            sampler = ResumableDistributedSampler(train_set, num_replicas=self.replicas, rank=self.trainer.replica,
                                                  shuffle=True, seed=self.cfg.seed, drop_last=True)
            self.loader = make_loader(train_set, self.per_process_batch, self.cfg, drop_last=True, sampler=sampler)
        self.owned = self.trainer.owned_parameters()

    def runtime(self) -> dict[str, Any]:
        return {"pipeline": {"segments": self.segments, "replicas": self.replicas, "cut": list(self.trainer.cut)}}

    def batches(self, epoch: int, skip: int) -> Iterable[list[tuple[Any, Any]]]:
        loader = None
        if self.loader is not None:
            self.train_set.set_epoch(epoch)
            self.loader.sampler.set_epoch(epoch)
            # mid-epoch resume: the order is a function of (seed, epoch); the sampler drops the consumed
            # batches' indices, so they are never read or decoded
            self.loader.sampler.skip = skip * self.accum * self.per_process_batch
            loader = device_batches(self.loader, self.data, self.accelerator.device, self.on_device)
        steps = self.steps_per_epoch - skip
        return micro_batch_groups(self.trainer.iterate(loader, steps=steps * self.accum), self.accum, steps)

    def step(self, x: Any, y: Any, sync: bool = True) -> dict[str, torch.Tensor]:
        out = self.trainer.step(x, y, backward=self.accelerator.backward, sync=sync)
        return out.dense(len(self.lm.stages))

    def agree_on_error(self, error: Optional[str]) -> Optional[str]:
        return error  # the process that saw it stops; the launcher stops the others

    def sync_gradients(self, clip_grad: Optional[float]) -> None:
        if clip_grad:  # averaged within replica groups by the engine; clipped per segment (docs/pipeline.md)
            self.accelerator.clip_grad_norm_(self.owned, clip_grad)

    def consolidate(self, optimizer: Any) -> None:
        self.trainer.consolidate(optimizer)

    def close(self) -> None:
        self.trainer.close()


def micro_batch_groups(batches: Iterable[tuple[Any, Any]], accum: int, steps: int
                       ) -> Iterator[list[tuple[Any, Any]]]:
    """``steps`` lists of ``accum`` consecutive micro-batches: the micro-batches of each optimizer step (the
    epoch's last micro-batches that do not fill a step are left, as ``drop_last`` leaves a short batch)."""
    it = iter(batches)
    for _ in range(steps):
        group = list(itertools.islice(it, accum))
        if len(group) < accum:
            return
        yield group


def stream_batches(loader: Iterable[Any], steps: int, skip: int) -> Iterator[Any]:
    """Batches ``skip`` to ``steps`` of an epoch of a stream: the consumed ones are read and dropped (a stream
    has no index to skip by; the resume rule of :mod:`timm_local.data.streams`), and a process whose shards
    ran short starts them again, so every process takes the same number of steps."""
    done = 0
    while done < steps:
        before = done
        for batch in loader:
            if done >= skip:
                yield batch
            done += 1
            if done == steps:
                return
        if done == before:
            raise RuntimeError("the stream yielded no batch on this process: fewer shards than processes x workers "
                               "(lower --workers or write more shards)")


#: Runner class by ``--engine``.
RUNNERS: dict[str, type] = {"sequential": SequentialRunner, "pipeline": PipelineRunner}


def make_runner(cfg: TrainConfig) -> Runner:
    """The runner of ``cfg.engine``, or an error naming the engines."""
    if cfg.engine not in RUNNERS:
        raise ValueError(f"--engine must be one of {', '.join(RUNNERS)}, got {cfg.engine!r}")
    return RUNNERS[cfg.engine](cfg)
