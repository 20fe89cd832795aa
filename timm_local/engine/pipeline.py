"""Pipelined local training across processes: W pipeline segments × R data-parallel replicas.

Why it is exact (issue 7, AUGLOCAL.md §1): local stage ℓ only needs the *detached* output of
stage ℓ-1 for batch t, computed with stage ℓ-1's weights after t-1 updates, and no gradient
ever flows back across a stage boundary. So a *forward-only* pipeline, in which segment s
receives (activation, labels, input) of batch t from segment s-1, runs its local stages'
forward/backward, hands the output on and lets the caller step the optimizer, never waits for
anything from downstream and computes bit for bit what the sequential engine computes: no
staleness, no bubble in steady state, no approximation.

Layout. ``world_size = W × R`` processes; global rank ``r·W + s`` runs segment ``s`` of
replica ``r`` (consecutive ranks form one pipeline, so on a multi-GPU node a pipeline's
neighbours are neighbouring GPUs). Segment ``s`` owns a contiguous run of the model's local
stages (chosen by :func:`~timm_local.engine.cut.balanced_cut` from each stage's training cost
*including its auxiliary network*) with their blocks, heads and, for the last segment, the
network's top. Replicas feed different data; after each local backward the gradients of that
local stage are all-reduced (averaged, asynchronously, overlapping the next stage's compute)
within the segment's replica group, as DDP would; BatchNorm buffers stay per replica and
replica 0's are authoritative (what DDP's ``broadcast_buffers`` gives).

Every rank holds the whole :class:`~timm_local.model.LocalModel` (all ranks start from rank
0's weights) but only trains what it owns; :meth:`PipelineTrainer.consolidate` broadcasts the
owners' tensors (and optimizer state) so that every rank's model and optimizer equal the
sequential engine's. That one collective serves evaluation (then any rank, or all ranks on
shards of the test set, evaluate ``model.backbone`` exactly as with the sequential engine),
checkpoints (same format as the sequential engine, resumable under any cut or engine) and
export (the same timm safetensors).

Transport is torch.distributed point-to-point (``isend``/``irecv``): gloo on CPU, NCCL on GPU.
A send is posted right after the segment's last forward (before its backward) and completes
in the background; with gloo, device tensors are staged through host memory, which is what
lets several processes share one GPU for functional runs (NCCL refuses two ranks per GPU).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..methods.base import LocalHead
from .cut import CostMeasure, CutReport, balanced_cut, local_stage_costs, segment_ranges, validate_cut
from .sequential import Backward, run_stage

if TYPE_CHECKING:  # model.py imports the engines, so engines import it only for types
    from ..model import LocalModel

__all__ = ["PipelineStepOutput", "PipelineTopology", "PipelineTrainer"]


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineTopology:
    """Which segment and replica a rank runs: ``rank = replica · W + segment``."""

    world_size: int
    num_segments: int  # W
    rank: int

    @classmethod
    def create(cls, world_size: int, rank: int, num_segments: int) -> "PipelineTopology":
        if num_segments < 1:
            raise ValueError(f"the number of pipeline stages W must be >= 1, got {num_segments}")
        if world_size % num_segments:
            raise ValueError(
                f"world size {world_size} is not divisible by the number of pipeline stages W={num_segments}: "
                f"launch W×R processes (R data-parallel replicas of a W-stage pipeline), e.g. "
                f"--nproc_per_node {num_segments} or {2 * num_segments}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        return cls(world_size, num_segments, rank)

    @property
    def num_replicas(self) -> int:
        """R: how many copies of the pipeline run on different data."""
        return self.world_size // self.num_segments

    @property
    def segment(self) -> int:
        return self.rank % self.num_segments

    @property
    def replica(self) -> int:
        return self.rank // self.num_segments

    def rank_of(self, segment: int, replica: int) -> int:
        return replica * self.num_segments + segment

    @property
    def is_first(self) -> bool:
        """This rank feeds data into its replica's pipeline."""
        return self.segment == 0

    @property
    def is_last(self) -> bool:
        """This rank runs the network's top and its loss (it holds the logits)."""
        return self.segment == self.num_segments - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def replica_group_ranks(self, segment: int) -> list[int]:
        """Ranks that run ``segment`` in every replica (they all-reduce its gradients)."""
        return [self.rank_of(segment, r) for r in range(self.num_replicas)]


# --------------------------------------------------------------------------------------------
# Point-to-point link between neighbouring segments
# --------------------------------------------------------------------------------------------
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_MAX_DIMS = 8
_SLOT = 2 + _MAX_DIMS  # dtype code (-1 = absent), ndim, dims
_FIELDS = 3  # activation, target, network input
_HEADER_LEN = _FIELDS * _SLOT


def _encode_header(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Dtypes and shapes of a message, so the receiver can allocate (batch sizes may vary)."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    for i, t in enumerate(tensors):
        slot = header[i * _SLOT:(i + 1) * _SLOT]
        if t is None:
            slot[0] = -1
            continue
        if t.dtype not in _DTYPES or t.ndim > _MAX_DIMS:
            raise TypeError(f"cannot pipeline a tensor of dtype {t.dtype} with {t.ndim} dims")
        slot[0] = _DTYPES.index(t.dtype)
        slot[1] = t.ndim
        slot[2:2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def _decode_header(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]] | None]:
    values = header.tolist()
    meta: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    for i in range(_FIELDS):
        code, ndim, *dims = values[i * _SLOT:(i + 1) * _SLOT]
        meta.append(None if code < 0 else (_DTYPES[code], tuple(dims[:ndim])))
    return meta


class _Link:
    """Messages (activation, target, input) to or from one neighbouring rank.

    Order of posting equals order of sending on both sides (header, then the present fields),
    which NCCL needs (it matches point-to-point operations by order, not by tag); gloo gets a
    tag per field on top. A send keeps its buffers alive until the next send or ``wait``,
    which also bounds how far an upstream segment can run ahead: one batch in flight.
    """

    def __init__(self, peer: int, device: torch.device, comm_device: torch.device) -> None:
        self.peer = peer
        self.device = device
        self.comm_device = comm_device
        self._works: list[Any] = []
        self._buffers: list[torch.Tensor] = []

    def send(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self.wait()
        header = _encode_header(tensors).to(self.comm_device)
        buffers = [header]
        works = [dist.isend(header, self.peer, tag=0)]
        for field, t in enumerate(tensors):
            if t is None:
                continue
            # Heads must not modify their input in place (the sequential engine relies on this
            # too: the next block reads the same storage), so no defensive copy is needed here.
            payload = t.detach().to(self.comm_device).contiguous()
            buffers.append(payload)
            works.append(dist.isend(payload, self.peer, tag=1 + field))
        self._works, self._buffers = works, buffers

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], []

    def recv(self) -> list[torch.Tensor | None]:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.comm_device)
        dist.irecv(header, self.peer, tag=0).wait()
        received: list[torch.Tensor | None] = []
        works = []
        for field, meta in enumerate(_decode_header(header.cpu())):
            if meta is None:
                received.append(None)
                continue
            dtype, shape = meta
            buffer = torch.empty(shape, dtype=dtype, device=self.comm_device)
            works.append(dist.irecv(buffer, self.peer, tag=1 + field))
            received.append(buffer)
        for work in works:
            work.wait()
        return [None if t is None else t.to(self.device) for t in received]


# --------------------------------------------------------------------------------------------
# Collectives on flattened buckets
# --------------------------------------------------------------------------------------------
def _by_dtype(tensors: Iterable[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault(t.dtype, []).append(t)
    return buckets


@torch.no_grad()
def _broadcast_inplace(tensors: Sequence[torch.Tensor], src: int, comm_device: torch.device) -> None:
    """Overwrite ``tensors`` on every rank with ``src``'s values, one message per dtype."""
    rank = dist.get_rank()
    for bucket in _by_dtype(tensors).values():
        flat = _flatten_dense_tensors([t.detach().to(comm_device) for t in bucket])
        dist.broadcast(flat, src)
        if rank != src:
            for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.detach().copy_(value)


class _GradAllReduce:
    """Asynchronous averaging of one local stage's gradients across the replicas of its segment."""

    def __init__(self, params: Sequence[nn.Parameter], group: Any, num_replicas: int, comm_device: torch.device) -> None:
        self.grads = [p.grad for p in params if p.grad is not None]
        self.num_replicas = num_replicas
        self.jobs = []
        for bucket in _by_dtype(self.grads).values():
            if any(g.is_sparse for g in bucket):
                raise NotImplementedError("sparse gradients cannot be all-reduced by the pipeline engine")
            flat = _flatten_dense_tensors([g.to(comm_device) for g in bucket])
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
            self.jobs.append((bucket, flat, work))

    @torch.no_grad()
    def finish(self) -> None:
        for bucket, flat, work in self.jobs:
            work.wait()
            flat.div_(self.num_replicas)
            for g, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(value)


# --------------------------------------------------------------------------------------------
# Ownership of the LocalModel's tensors by local stage
# --------------------------------------------------------------------------------------------
def tensors_by_local_stage(model: LocalModel) -> list[list[tuple[str, torch.Tensor]]]:
    """Every entry of ``model.state_dict()`` assigned to the local stage that trains it.

    A stage owns its primary blocks and its head; the last stage (head=None) also owns the
    backbone tensors outside every block, i.e. the network's top (pooling, classifier) that
    runs there. A tensor shared by two stages cannot be split across processes: error.
    """
    stages = model.stages
    if not stages or stages[-1].head is not None:
        raise ValueError("a method's last local stage must use the network's own top (head=None)")
    owner: dict[int, int] = {}

    def claim(module: nn.Module, j: int) -> None:
        for t in itertools.chain(module.parameters(), module.buffers()):
            previous = owner.setdefault(id(t), j)
            if previous != j:
                raise ValueError(
                    f"a tensor is shared by local stages {previous} and {j}; the pipeline engine needs "
                    "each parameter and buffer to belong to exactly one local stage"
                )

    for j, stage in enumerate(stages):
        for index in stage.blocks:
            claim(model.partition.blocks[index], j)
        if stage.head is not None:
            claim(stage.head, j)
    owned: list[list[tuple[str, torch.Tensor]]] = [[] for _ in stages]
    for name, t in model.state_dict(keep_vars=True).items():
        j = owner.get(id(t))
        if j is None:
            if not name.startswith("backbone."):
                raise ValueError(f"state entry {name!r} belongs to no local stage")
            j = len(stages) - 1  # the network's top runs in the last stage
        owned[j].append((name, t))
    return owned


def _needs_inputs(head: LocalHead | None) -> bool:
    """Whether a head's loss may read the network input (InfoPro's reconstruction does).

    The default :meth:`LocalHead.local_loss` ignores it; any override is assumed to need it.
    """
    return head is not None and type(head).local_loss is not LocalHead.local_loss


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
@dataclass
class PipelineStepOutput:
    """Detached results of one pipelined step *on this rank*.

    ``losses``/``head_logits`` are keyed by local stage index (this rank's stages only);
    ``logits`` (the network's output) exists on the last segment only; ``target`` is the
    batch's labels as they reached this rank, so the last segment can compute accuracy.
    """

    losses: dict[int, torch.Tensor]
    head_logits: dict[int, torch.Tensor | None]
    logits: torch.Tensor | None
    target: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """The network's own loss on the last segment, else this rank's last local loss."""
        return self.losses[max(self.losses)]

    def dense(self, num_stages: int) -> dict[str, torch.Tensor]:
        """Per-local-stage sums over this batch, zero where another rank owns the stage.

        ``loss_sum[j]`` (loss × samples), ``samples[j]``, ``correct[j]`` (head j's top-1 hits;
        the network's for the last stage) and ``scored[j]`` (samples of stages whose loss
        returned logits): summed over a logging window and then over all ranks (one
        all-reduce), ``loss_sum / samples`` and ``correct / scored`` are every stage's mean loss
        and accuracy over all replicas, the sequential engine's diagnostics.
        """
        device = self.target.device
        loss_sum = torch.zeros(num_stages, dtype=torch.float64, device=device)
        correct = torch.zeros_like(loss_sum)
        samples = torch.zeros_like(loss_sum)
        scored = torch.zeros_like(loss_sum)
        batch = self.target.shape[0]
        labels = self.target if self.target.ndim == 1 else self.target.argmax(1)  # soft targets (mixup)
        for j, loss in self.losses.items():
            loss_sum[j] = loss.double() * batch
            samples[j] = batch
            logits = self.logits if j not in self.head_logits else self.head_logits[j]
            if logits is not None:
                correct[j] = (logits.argmax(1) == labels).sum().double()
                scored[j] = batch
        return {"loss_sum": loss_sum, "samples": samples, "correct": correct, "scored": scored}


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Accelerate wraps optimizers; the state lives in the wrapped ``torch.optim.Optimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class PipelineTrainer:
    """Runs a :class:`LocalModel`'s local step as a W-stage pipeline × R replicas.

    Call it on **every** rank, with the same arguments, after ``torch.distributed`` is
    initialised (``torchrun`` / ``accelerate launch`` / :func:`timm_local.engine.launch_local`).
    Every rank must have built the same architecture; weights are taken from rank 0.

    Per iteration, on every rank (exactly like the sequential engine's loop)::

        optimizer.zero_grad(set_to_none=True)
        out = trainer.step(x, y, backward)   # x, y: real batch on first-segment ranks, else None
        optimizer.step(); scheduler.step()

    The optimizer may be built over *all* of ``model.parameters()`` on every rank, as for the
    sequential engine: parameters this rank does not own never get a gradient, so optimizers
    skip them, and weight decay/momentum are per parameter, so stepping disjoint parameter
    sets in different processes equals one step over all of them. (Global-norm gradient
    clipping is the exception: it couples all stages; clip per rank or per local stage.)

    Args:
        model: the LocalModel (any method); moved to ``device``.
        num_segments: W, the number of pipeline stages; default: the world size (R = 1).
        cut: start index (into ``model.stages``) of each segment; default: balanced cut.
        costs: per-local-stage costs for the balanced cut; default: estimated on rank 0.
        cost_measure: ``"time"`` (measured on rank 0's device: on CPU, early high-resolution
            stages cost ~1.5x more per MAC than late ones, which a MAC count cannot see) or
            ``"macs"`` (deterministic). The cut only changes speed, never results: any cut
            computes exactly the sequential engine's step.
        input_size: (C, H, W) for the cost estimate; default: the backbone's pretrained_cfg.
        cost_batch_size: batch size for the ``"time"`` estimate (use the per-replica batch).
        device: where this rank computes; default: ``cuda:LOCAL_RANK`` under NCCL, else the
            model's current device.
        sync_init: broadcast rank 0's weights to all ranks first (as DDP does), so that
            every replica and segment starts from the same model whatever each rank's seed.
        verbose: print the topology and the cut (rank 0).
    """

    def __init__(
        self,
        model: LocalModel,
        num_segments: int | None = None,
        *,
        cut: Sequence[int] | None = None,
        costs: Sequence[float] | None = None,
        cost_measure: CostMeasure = "time",
        input_size: Sequence[int] | None = None,
        cost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        sync_init: bool = True,
        verbose: bool = True,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "the pipeline engine needs an initialised torch.distributed process group: launch with "
                "`torchrun --nproc_per_node W×R` or `accelerate launch --num_processes W×R`, or use "
                "timm_local.engine.launch_local on one machine"
            )
        world_size = dist.get_world_size()
        self.topology = PipelineTopology.create(
            world_size, dist.get_rank(), world_size if num_segments is None else int(num_segments)
        )
        self.model = model
        self.backend = str(dist.get_backend())
        self.device = self._resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model.to(self.device)
        # gloo moves host memory only: stage device tensors through the CPU.
        self.comm_device = torch.device("cpu") if self.backend == "gloo" else self.device

        topo = self.topology
        n_stages = len(model.stages)
        self._owned = tensors_by_local_stage(model)
        if sync_init and world_size > 1:
            _broadcast_inplace([t for stage in self._owned for _, t in stage], 0, self.comm_device)

        self.cut = self._choose_cut(cut, costs, cost_measure, input_size, cost_batch_size, verbose)
        self.segment_stages: list[range] = segment_ranges(self.cut, n_stages)
        self.local_stages: range = self.segment_stages[topo.segment]
        self._stage_params: dict[int, list[nn.Parameter]] = {
            j: [t for _, t in self._owned[j] if isinstance(t, nn.Parameter) and t.requires_grad]
            for j in self.local_stages
        }
        later = range(self.local_stages.stop, n_stages)
        self._send_inputs = any(_needs_inputs(model.stages[j].head) for j in later)

        # Every rank must create every replica group, in the same order (torch.distributed rule).
        self._replica_group = None
        if topo.num_replicas > 1:
            for s in range(topo.num_segments):
                group = dist.new_group(topo.replica_group_ranks(s))
                if s == topo.segment:
                    self._replica_group = group
        self._prev = None if topo.prev_rank is None else _Link(topo.prev_rank, self.device, self.comm_device)
        self._next = None if topo.next_rank is None else _Link(topo.next_rank, self.device, self.comm_device)
        self.steps = 0
        # Cumulative seconds, to see where a pipeline loses time (cheap: a few clock reads/step).
        self.wait_times: dict[str, float] = {"recv": 0.0, "send": 0.0, "allreduce": 0.0, "step": 0.0}

    # ---------------------------------------------------------------- setup helpers
    def _resolve_device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        if self.backend == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return next(self.model.parameters()).device

    def _choose_cut(
        self,
        cut: Sequence[int] | None,
        costs: Sequence[float] | None,
        measure: CostMeasure,
        input_size: Sequence[int] | None,
        cost_batch_size: int | None,
        verbose: bool,
    ) -> list[int]:
        """Rank 0 decides (estimating costs if needed) and broadcasts, so all ranks agree."""
        n_stages, w = len(self.model.stages), self.topology.num_segments
        if w > n_stages:
            raise ValueError(
                f"{self.model.method_name} on this model has {n_stages} local stages; it cannot be cut into "
                f"W={w} pipeline stages (each needs at least one local stage)"
            )
        if measure not in ("macs", "time"):
            raise ValueError(f"cost_measure must be 'macs' or 'time', got {measure!r}")
        # Validate on every rank (an error on rank 0 alone would leave the others waiting).
        if costs is not None and len(costs) != n_stages:
            raise ValueError(f"got {len(costs)} stage costs for {n_stages} local stages")
        if cut is not None:
            cut = validate_cut(cut, n_stages, w)
        decision: list[Any] = [None]
        if self.topology.rank == 0:
            label = "given" if costs is not None else measure
            if costs is None and w == 1:  # nothing to balance (pure data parallelism)
                costs, label = [0.0] * n_stages, "none needed, W=1"
            elif costs is None:  # also for a given cut: the printed shares show how balanced it is
                costs = local_stage_costs(self.model, input_size, measure, cost_batch_size)
            costs = [float(c) for c in costs]
            starts = list(cut) if cut is not None else balanced_cut(costs, w)
            decision = [CutReport(starts, costs, label)]
        if self.topology.world_size > 1:
            dist.broadcast_object_list(decision, src=0)
        report = decision[0]
        self.cut_report: CutReport = report
        if verbose and self.topology.rank == 0:
            names = [[self.model.partition.names[b] for b in s.blocks] for s in self.model.stages]
            topo = self.topology
            print(
                f"[timm_local pipeline] W={topo.num_segments} stages x R={topo.num_replicas} replicas, "
                f"backend {self.backend}, device {self.device}\n{report.describe(names)}",
                flush=True,
            )
        return list(report.starts)

    # ---------------------------------------------------------------- properties
    @property
    def is_first(self) -> bool:
        return self.topology.is_first

    @property
    def is_last(self) -> bool:
        return self.topology.is_last

    @property
    def segment(self) -> int:
        return self.topology.segment

    @property
    def replica(self) -> int:
        """Index of this rank's pipeline replica: shard the training data by it (R shards)."""
        return self.topology.replica

    @property
    def num_replicas(self) -> int:
        return self.topology.num_replicas

    def owned_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters this rank updates (for an optimizer over owned tensors only)."""
        return [p for j in self.local_stages for p in self._stage_params[j]]

    def owned_names(self) -> list[str]:
        """``model.state_dict()`` keys this rank's segment owns."""
        return [name for j in self.local_stages for name, _ in self._owned[j]]

    # ---------------------------------------------------------------- training
    def step(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        backward: Backward | None = None,
    ) -> PipelineStepOutput:
        """Process the next batch at this rank's segment: local forwards and backwards.

        First-segment ranks must pass the batch; other ranks receive it from upstream (pass
        nothing). The k-th call on every rank processes the same batch k, so calls must be
        made the same number of times on every rank. Gradients are complete (and averaged
        across replicas) on return; the caller steps the optimizer before the next call.
        """
        step_start = time.perf_counter()
        if self.is_first:
            if x is None or y is None:
                raise ValueError(
                    f"rank {self.topology.rank} runs the first pipeline segment: step(x, y) needs the batch"
                )
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            h, inputs = x, x
        else:
            assert self._prev is not None
            start = time.perf_counter()
            h, y, inputs = self._prev.recv()
            self.wait_times["recv"] += time.perf_counter() - start
            assert h is not None and y is not None
        backward = backward or _default_backward
        partition, stages = self.model.partition, self.model.stages
        last_local = self.local_stages[-1]
        losses: dict[int, torch.Tensor] = {}
        head_logits: dict[int, torch.Tensor | None] = {}
        logits = None
        reductions: list[_GradAllReduce] = []
        for j in self.local_stages:
            stage = stages[j]
            h, loss, stage_logits = run_stage(partition, stage, h.detach(), y, inputs)
            if j == last_local and self._next is not None:
                # Hand the batch on before this stage's backward: downstream starts at once.
                start = time.perf_counter()
                self._next.send([h, y, inputs if self._send_inputs else None])
                self.wait_times["send"] += time.perf_counter() - start
            backward(loss)
            if self._replica_group is not None:
                reductions.append(_GradAllReduce(self._stage_params[j], self._replica_group,
                                                 self.num_replicas, self.comm_device))
            losses[j] = loss.detach()
            detached = None if stage_logits is None else stage_logits.detach()
            if stage.head is None:
                logits = detached
            else:
                head_logits[j] = detached
        # As in the sequential engine: one finiteness check (one device sync) per step, raised
        # before the caller's optimizer step. Downstream segments have this batch already; the
        # launcher stops them when this rank exits.
        stacked = torch.stack(list(losses.values()))
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            bad = list(losses)[int((~finite).nonzero()[0])]
            raise FloatingPointError(
                f"local loss of the stage ending at block {partition.names[stages[bad].blocks[-1]]!r} is "
                f"{losses[bad].item()} (pipeline rank {self.topology.rank}, step {self.steps}); lower the "
                "learning rate or check the input normalisation"
            )
        start = time.perf_counter()
        for reduction in reductions:
            reduction.finish()
        self.wait_times["allreduce"] += time.perf_counter() - start
        self.wait_times["step"] += time.perf_counter() - step_start
        self.steps += 1
        return PipelineStepOutput(losses, head_logits, logits, y)

    def iterate(self, loader: Iterable[Any] | None = None, steps: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Yield ``(x, y)`` for each step of an epoch on first-segment ranks, ``(None, None)``
        elsewhere, the same number of times on every rank.

        Only first-segment ranks need a ``loader`` (sharded by :attr:`replica` over
        :attr:`num_replicas`). Without ``steps`` rank 0 broadcasts ``len(loader)`` (a
        collective, hence one pipeline drain per epoch); pass ``steps`` to avoid it.
        """
        if steps is None:
            box: list[Any] = [len(loader) if self.topology.rank == 0 and loader is not None else None]
            if self.topology.world_size > 1:
                dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                raise ValueError("rank 0 must be given the loader (or pass steps=) to iterate()")
            steps = int(box[0])
        if not self.is_first:
            for _ in range(steps):
                yield None, None
            return
        if loader is None:
            raise ValueError(f"rank {self.topology.rank} runs the first pipeline segment: iterate() needs the loader")
        batches = iter(loader)
        for i in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"the loader of replica {self.replica} ran out after {i} of {steps} steps: every replica's "
                    "loader must have the same length (use a sampler that pads, e.g. DistributedSampler)"
                ) from None
            yield batch[0], batch[1]

    def flush(self) -> None:
        """Wait until this rank's last activation send has been received downstream."""
        if self._next is not None:
            self._next.wait()

    def close(self) -> None:
        self.flush()

    # ---------------------------------------------------------------- state
    def consolidate(self, optimizer: Any | None = None) -> None:
        """Collective (all ranks): make every rank's model — and ``optimizer`` if given —
        hold the complete trained state, taken from replica 0's owner of each tensor.

        Afterwards ``model.state_dict()`` / ``optimizer.state_dict()`` on any rank equal what
        the sequential engine would hold, so evaluation, export and checkpoints are the
        sequential engine's code unchanged. The optimizer must index parameters by
        ``model.named_parameters()`` (any subset, any order: state is matched by name).
        """
        self.flush()
        topo = self.topology
        if topo.world_size == 1:
            return
        for s, stage_range in enumerate(self.segment_stages):
            tensors = [t for j in stage_range for _, t in self._owned[j]]
            _broadcast_inplace(tensors, topo.rank_of(s, 0), self.comm_device)
        if optimizer is not None:
            self._consolidate_optimizer(_unwrap_optimizer(optimizer))

    def _consolidate_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        topo = self.topology
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        merged: dict[str, dict[str, Any]] = {}
        for s, stage_range in enumerate(self.segment_stages):
            src = topo.rank_of(s, 0)
            box: list[Any] = [None]
            if topo.rank == src:
                owned = {name for j in stage_range for name, _ in self._owned[j]}
                box[0] = {
                    name_of[id(p)]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                    for p in params
                    if p in optimizer.state and name_of.get(id(p)) in owned
                }
            dist.broadcast_object_list(box, src=src)
            merged.update(box[0])
        state = optimizer.state_dict()
        index_of = {name_of[id(p)]: i for i, p in enumerate(params) if id(p) in name_of}
        state["state"] = {index_of[name]: value for name, value in merged.items() if name in index_of}
        optimizer.load_state_dict(state)

    def gather_backbone(self) -> nn.Module:
        """Collective: the complete trained timm backbone (same on every rank), for export."""
        self.consolidate()
        return self.model.backbone

    def state_dict(self) -> dict[str, Any]:
        """This segment's tensors only (keys as in ``model.state_dict()``) plus the cut.

        For per-rank checkpoint files without a collective; :meth:`consolidate` + the
        sequential engine's checkpoint code is the portable alternative.
        """
        return {
            "format": "timm_local.pipeline_segment/1",
            "cut": list(self.cut),
            "segment": self.segment,
            "model": {name: t.detach() for j in self.local_stages for name, t in self._owned[j]},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` written by the same segment under the same cut."""
        if state.get("format") != "timm_local.pipeline_segment/1":
            raise ValueError(
                "not a pipeline segment state (PipelineTrainer.state_dict()); load a full LocalModel "
                "state with model.load_state_dict on every rank instead"
            )
        if list(state["cut"]) != list(self.cut) or state["segment"] != self.segment:
            raise ValueError(
                f"segment state was saved for segment {state['segment']} of cut {state['cut']}, this rank runs "
                f"segment {self.segment} of cut {self.cut}: resume with the same cut (pass cut=) or from a "
                "consolidated full checkpoint"
            )
        tensors = {name: t for j in self.local_stages for name, t in self._owned[j]}
        missing = sorted(set(tensors) - set(state["model"]))
        unexpected = sorted(set(state["model"]) - set(tensors))
        if missing or unexpected:
            raise KeyError(f"segment state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, t in tensors.items():
            t.detach().copy_(state["model"][name])

