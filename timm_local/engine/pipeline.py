"""Pipelined local training across processes: W pipeline segments × R data-parallel replicas.

Why it is exact (docs/spec.md §1): local stage ℓ only needs the *detached* output of stage ℓ-1 for
batch t, computed with stage ℓ-1's weights after t-1 updates, and no gradient ever flows back across
a stage boundary. So a *forward-only* pipeline, in which segment s receives (activation, labels,
input) of batch t from segment s-1, runs its local stages' forward/backward, hands the output on and
lets the caller step the optimizer, never waits for anything from downstream and computes bit for
bit what the sequential engine computes: no staleness, no bubble in steady state, no approximation.

Layout (:class:`~timm_local.engine.topology.PipelineTopology`): ``world_size = W × R`` processes;
global rank ``r·W + s`` runs segment ``s`` of replica ``r``. Segment ``s`` owns a contiguous run of
the model's local stages (chosen by :func:`~timm_local.engine.cut.balanced_cut` from each stage's
training cost *including its auxiliary network*) with their blocks, heads and, for the last
segment, the network's top (:mod:`~timm_local.engine.ownership`). Replicas feed different data;
after each local backward the gradients of that local stage are averaged asynchronously within the
segment's replica group (:class:`~timm_local.distributed.GradientAverage`, overlapping the next
stage's compute), as DDP would; BatchNorm buffers stay per replica and replica 0's are
authoritative (what DDP's ``broadcast_buffers`` gives).

Every rank holds the whole :class:`~timm_local.model.LocalModel` (all ranks start from rank
0's weights) but only trains what it owns; :meth:`PipelineTrainer.consolidate` broadcasts the
owners' tensors (and optimizer state) so that every rank's model and optimizer equal the
sequential engine's. That one collective serves evaluation, checkpoints (same format as the
sequential engine, resumable under any cut or engine) and export (the same timm safetensors).

Transport (:mod:`~timm_local.engine.p2p`) is torch.distributed point-to-point: gloo on CPU, NCCL
on GPU. A send is posted right after the segment's last forward (before its backward) and
completes in the background; with gloo, device tensors are staged through host memory, which is
what lets several processes share one GPU for functional runs (NCCL refuses two ranks per GPU).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..distributed import GradientAverage, broadcast_tensors
from .consolidate import broadcast_from_owners, merge_optimizer_state
from .cut import CostMeasure, CutReport, agree_on_cut, segment_ranges
from .ownership import needs_inputs, refuse_cross_segment_reads, tensors_by_local_stage
from .p2p import ActivationLink
from .segment_state import load_segment_state, segment_state
from .stage import Backward, check_finite_losses, default_backward, run_stage, stage_sums
from .topology import PipelineTopology, require_process_group

if TYPE_CHECKING:  # model.py imports the engines, so engines import it only for types
    from ..model import LocalModel

__all__ = ["PipelineStepOutput", "PipelineTrainer"]


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
        """Per-local-stage sums over this batch, zero where another rank owns the stage
        (:func:`~timm_local.engine.stage.stage_sums`): summed over a logging window and then over
        all ranks (one all-reduce), they give every stage's mean loss and accuracy over all replicas,
        the sequential engine's diagnostics.
        """
        logits = dict(self.head_logits)
        if self.logits is not None:
            logits[max(self.losses)] = self.logits
        return stage_sums(self.losses, logits, self.target, num_stages)


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
        timeout: how long the replica groups' gradient all-reduces wait for a lost replica
            (default: torch's); the world group's own timeout is the launcher's.
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
        timeout: timedelta | None = None,
    ) -> None:
        require_process_group()
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
        self._owned = tensors_by_local_stage(model)
        if sync_init and world_size > 1:
            broadcast_tensors([t for stage in self._owned for _, t in stage], 0, self.comm_device)
        self.cut_report: CutReport = agree_on_cut(model, self.topology, cut, costs, cost_measure, input_size,
                                                  cost_batch_size)
        if verbose and self.topology.rank == 0:
            names = [[model.partition.names[b] for b in s.blocks] for s in model.stages]
            print(f"[timm_local pipeline] W={self.topology.num_segments} stages x R={self.num_replicas} replicas, "
                  f"backend {self.backend}, device {self.device}\n{self.cut_report.describe(names)}", flush=True)
        self._take_segment(list(self.cut_report.starts))
        self._replica_group = self.topology.replica_process_group(timeout)
        prev_rank, next_rank = self.topology.prev_rank, self.topology.next_rank
        self._prev = None if prev_rank is None else ActivationLink(prev_rank, self.device, self.comm_device)
        self._next = None if next_rank is None else ActivationLink(next_rank, self.device, self.comm_device)
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

    def _take_segment(self, cut: list[int]) -> None:
        """Fix which local stages this rank trains under ``cut``, refusing a cut whose segments would read
        each other's weights, and which of their parameters it averages and whether it sends the network
        input on (only when a later segment's head reads it)."""
        self.cut = cut
        self.segment_stages: list[range] = segment_ranges(cut, len(self.model.stages))
        self.local_stages: range = self.segment_stages[self.topology.segment]
        refuse_cross_segment_reads(self.model, self.segment_stages)
        self._stage_params: dict[int, list[nn.Parameter]] = {
            j: [t for _, t in self._owned[j] if isinstance(t, nn.Parameter) and t.requires_grad]
            for j in self.local_stages
        }
        later = range(self.local_stages.stop, len(self.model.stages))
        self._send_inputs = any(needs_inputs(self.model.stages[j].head) for j in later)

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
        x: torch.Tensor | None = None, y: torch.Tensor | None = None,
        backward: Backward | None = None,
        sync: bool = True,
    ) -> PipelineStepOutput:
        """Process the next batch at this rank's segment: local forwards and backwards.

        First-segment ranks must pass the batch; other ranks receive it from upstream (pass
        nothing). The k-th call on every rank processes the same batch k, so calls must be
        made the same number of times on every rank. Gradients are complete (and averaged
        across replicas) on return; the caller steps the optimizer before the next call.
        ``sync=False`` (gradient accumulation: not the last micro-batch of an optimizer step) adds
        this batch's gradients to those already there without averaging across replicas; the
        call with ``sync=True`` then averages the sum once.
        """
        step_start = time.perf_counter()
        h, y, inputs, received = self._batch_in(x, y)
        out, reductions = self._run_local_stages(h, y, inputs, backward or default_backward, sync)
        # Downstream segments have this batch already; the launcher stops them when this rank exits.
        check_finite_losses(out.losses, self.model.partition, self.model.stages,
                            f" (pipeline rank {self.topology.rank}, step {self.steps})", received)
        start = time.perf_counter()
        for reduction in reductions:
            reduction.finish()
        self.wait_times["allreduce"] += time.perf_counter() - start
        self.wait_times["step"] += time.perf_counter() - step_start
        self.steps += 1
        return out

    def _batch_in(self, x: torch.Tensor | None, y: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(activation, labels, network input) of this step, and the activation as received from upstream
        (None on the first segment): a non-finite input means the upstream segment is the one to report."""
        if self.is_first:
            if x is None or y is None:
                raise ValueError(
                    f"rank {self.topology.rank} runs the first pipeline segment: step(x, y) needs the batch"
                )
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return x, y, x, None
        assert self._prev is not None
        start = time.perf_counter()
        h, y, inputs = self._prev.recv()
        self.wait_times["recv"] += time.perf_counter() - start
        assert h is not None and y is not None
        return h, y, inputs, h

    def _run_local_stages(self, h: torch.Tensor, y: torch.Tensor, inputs: torch.Tensor | None,
                          backward: Backward, sync: bool) -> tuple[PipelineStepOutput, list[GradientAverage]]:
        """Forward and backward of this rank's local stages on one batch. The output goes downstream before
        the last stage's backward (downstream starts at once), and each stage's gradient average is posted
        as soon as its backward ends (it overlaps the next stage's compute); the caller finishes them."""
        partition, stages = self.model.partition, self.model.stages
        out = PipelineStepOutput({}, {}, None, y)
        reductions: list[GradientAverage] = []
        previous = None  # (stage, its detached input): what a cascade stage runs again
        for j in self.local_stages:
            stage = stages[j]
            h_in = h.detach()
            h, loss, stage_logits = run_stage(partition, stage, h_in, y, inputs, previous)
            previous = (stage, h_in)
            if j == self.local_stages[-1] and self._next is not None:
                start = time.perf_counter()
                self._next.send([h, y, inputs if self._send_inputs else None])
                self.wait_times["send"] += time.perf_counter() - start
            if stage.has_loss:
                backward(loss)
            if stage.head is not None:
                stage.head.after_backward()
            if sync and self._replica_group is not None:
                reductions.append(GradientAverage(self._stage_params[j], self.num_replicas,
                                                  self._replica_group, self.comm_device))
            out.losses[j] = loss.detach()
            detached = None if stage_logits is None else stage_logits.detach()
            if stage.head is None:
                out.logits = detached
            else:
                out.head_logits[j] = detached
        return out, reductions

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
        hold the complete trained state, taken from replica 0's owner of each tensor
        (:mod:`~timm_local.engine.consolidate`).
        """
        self.flush()
        if self.topology.world_size == 1:
            return
        segments = [[name_t for j in r for name_t in self._owned[j]] for r in self.segment_stages]
        broadcast_from_owners([[t for _, t in seg] for seg in segments], self.topology, self.comm_device)
        if optimizer is not None:
            merge_optimizer_state(optimizer, self.model, [{n for n, _ in seg} for seg in segments], self.topology)

    def gather_backbone(self) -> nn.Module:
        """Collective: the complete trained timm backbone (same on every rank), for export."""
        self.consolidate()
        return self.model.backbone

    def state_dict(self) -> dict[str, Any]:
        """This segment's tensors only (keys as in ``model.state_dict()``) plus the cut.

        For per-rank checkpoint files without a collective; :meth:`consolidate` + the
        sequential engine's checkpoint code is the portable alternative.
        """
        return segment_state(self._segment_tensors(), self.cut, self.segment)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` written by the same segment under the same cut."""
        load_segment_state(state, self._segment_tensors(), self.cut, self.segment)

    def _segment_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for j in self.local_stages for name, t in self._owned[j]}

