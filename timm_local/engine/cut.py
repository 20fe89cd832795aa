"""Where to cut a LocalModel's local stages into pipeline segments.

A pipelined step takes as long as its slowest segment (the others wait for it), so the cut
that matters is the one minimising the most expensive segment. The cost of a *local stage* is
its whole training cost: its primary blocks forward and backward **plus its auxiliary
network** (AugLocal's heads copy later blocks, so early stages are much heavier than their
primary block alone suggests). Two estimates:

* ``"macs"``: multiply-accumulates of one training forward of the stage (blocks +
  ``head.local_loss``, or the network's top + cross-entropy for the last stage), counted at
  the ATen level; deterministic, device independent, blind to memory-bound ops (BN, ReLU).
* ``"time"``: measured forward + backward wall time of each stage on a copy of the model, on
  the device the model lives on; includes memory-bound ops and the real kernels, but is noisy
  on a loaded machine.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
import torch.distributed as dist

from ..balance import min_max_split
from ..macs import count_macs
from .stage import run_stage
from .topology import PipelineTopology

if TYPE_CHECKING:  # model.py imports the engines, so engines import it only for types
    from ..model import LocalModel

CostMeasure = Literal["macs", "time"]


def _sample_batch(model: torch.nn.Module, input_size: Sequence[int], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=generator).to(param.device, param.dtype)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(param.device)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_stage_costs(
    model: LocalModel,
    input_size: Sequence[int] | None = None,
    measure: CostMeasure = "macs",
    batch_size: int | None = None,
    repeats: int = 3,
) -> list[float]:
    """Training cost of every local stage of ``model`` (block(s) + auxiliary network).

    ``"macs"`` returns forward MACs per sample; ``"time"`` returns the fastest of ``repeats``
    forward + backward runs of each stage at ``batch_size`` (default 32), in seconds. Only ratios matter for the
    cut. Neither changes ``model``: timing runs on a deep copy (BatchNorm statistics and
    gradients of the original are untouched).
    """
    if input_size is None:
        input_size = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    if measure not in ("macs", "time"):
        raise ValueError(f"cost measure must be 'macs' or 'time', got {measure!r}")
    batch_size = batch_size or (2 if measure == "macs" else 32)
    probe = copy.deepcopy(model)
    x, y = _sample_batch(probe, input_size, batch_size)
    device = x.device
    costs: list[float] = []
    h = x
    previous = None  # what a cascade stage runs again (engine/stage.py)
    if measure == "macs":
        probe.eval()  # MAC counts do not depend on the BatchNorm mode
        with torch.no_grad():
            for stage in probe.stages:
                out: list[torch.Tensor] = []
                macs = count_macs(lambda: out.append(run_stage(probe.partition, stage, h, y, x, previous)[0]), probe)
                costs.append(macs / batch_size)
                previous, h = (stage, h), out[0]
        return costs
    probe.train()
    for stage in probe.stages:
        h_in = h.detach()
        times = []
        for i in range(repeats + 1):  # first run warms up kernels / allocator
            probe.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            out, loss, _ = run_stage(probe.partition, stage, h_in, y, x, previous)
            if stage.has_loss:
                loss.backward()
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
        costs.append(min(times))  # the least disturbed run: other processes only ever add time
        previous, h = (stage, h_in), out.detach()
    return costs


def balanced_cut(costs: Sequence[float], num_segments: int) -> list[int]:
    """Start index of each of ``num_segments`` contiguous, non-empty segments of ``costs``
    minimising the largest segment sum (:func:`~timm_local.balance.min_max_split`).
    """
    n = len(costs)
    if num_segments < 1:
        raise ValueError(f"the number of pipeline segments must be >= 1, got {num_segments}")
    if num_segments > n:
        raise ValueError(
            f"cannot cut {n} local stages into {num_segments} pipeline segments: each segment needs "
            f"at least one local stage; use at most {n} pipeline stages"
        )
    if any(c < 0 for c in costs):
        raise ValueError("local stage costs must be non-negative")
    return min_max_split(costs, num_segments)


def segment_ranges(starts: Sequence[int], num_stages: int) -> list[range]:
    """Local stage indices of each segment, from its start indices."""
    ends = list(starts[1:]) + [num_stages]
    return [range(a, b) for a, b in zip(starts, ends)]


def validate_cut(starts: Sequence[int], num_stages: int, num_segments: int) -> list[int]:
    """Check a user-given cut (start index of each segment) and return it as a list."""
    starts = [int(s) for s in starts]
    if len(starts) != num_segments:
        raise ValueError(
            f"a cut into {num_segments} pipeline segments needs {num_segments} start indices, got {starts}"
        )
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_stages:
        raise ValueError(
            f"invalid cut {starts}: start indices must begin at 0, increase strictly and stay below the "
            f"number of local stages ({num_stages})"
        )
    return starts


@dataclass(frozen=True)
class CutReport:
    """A cut with the numbers that justify it (printed at start by the pipeline engine)."""

    starts: list[int]
    costs: list[float]
    measure: str

    @property
    def segment_costs(self) -> list[float]:
        return [sum(self.costs[i] for i in r) for r in segment_ranges(self.starts, len(self.costs))]

    @property
    def predicted_speedup(self) -> float:
        """Sequential time / pipelined time if communication were free: total / slowest."""
        worst = max(self.segment_costs)
        return sum(self.costs) / worst if worst > 0 else float(len(self.starts))

    def describe(self, block_names: Sequence[Sequence[str]] | None = None) -> str:
        total = sum(self.costs) or 1.0
        unit = "MACs/sample" if self.measure == "macs" else "s/step"
        lines = [f"pipeline cut into {len(self.starts)} segments (cost: {self.measure}, {unit}):"]
        for s, r in enumerate(segment_ranges(self.starts, len(self.costs))):
            cost = sum(self.costs[i] for i in r)
            names = ""
            if block_names is not None:
                first, last = block_names[r.start][0], block_names[r.stop - 1][-1]
                names = f"  blocks {first} .. {last}"
            lines.append(
                f"  segment {s}: local stages {r.start}..{r.stop - 1} ({len(r)}){names}  "
                f"cost {cost:.4g} ({100 * cost / total:.1f}%)"
            )
        lines.append(f"  predicted speed-up over sequential (free communication): {self.predicted_speedup:.2f}x")
        return "\n".join(lines)


def agree_on_cut(
    model: LocalModel,
    topology: PipelineTopology,
    cut: Sequence[int] | None = None,
    costs: Sequence[float] | None = None,
    measure: CostMeasure = "time",
    input_size: Sequence[int] | None = None,
    cost_batch_size: int | None = None,
) -> CutReport:
    """The cut every rank of a pipeline uses: rank 0 decides (estimating costs if needed) and broadcasts.

    Why rank 0 alone: a ``"time"`` estimate differs from process to process, and every rank must run
    the same cut. Arguments are validated on every rank first, so an error never leaves the others
    waiting in the broadcast.
    """
    n_stages, w = len(model.stages), topology.num_segments
    if w > n_stages:
        raise ValueError(
            f"{model.method_name} on this model has {n_stages} local stages; it cannot be cut into "
            f"W={w} pipeline stages (each needs at least one local stage)"
        )
    if measure not in ("macs", "time"):
        raise ValueError(f"cost_measure must be 'macs' or 'time', got {measure!r}")
    if costs is not None and len(costs) != n_stages:
        raise ValueError(f"got {len(costs)} stage costs for {n_stages} local stages")
    if cut is not None:
        cut = validate_cut(cut, n_stages, w)
    decision: list[Any] = [None]
    if topology.rank == 0:
        label = "given" if costs is not None else measure
        if costs is None and w == 1:  # nothing to balance (pure data parallelism)
            costs, label = [0.0] * n_stages, "none needed, W=1"
        elif costs is None:  # also for a given cut: the printed shares show how balanced it is
            costs = local_stage_costs(model, input_size, measure, cost_batch_size)
        costs = [float(c) for c in costs]
        starts = list(cut) if cut is not None else balanced_cut(costs, w)
        decision = [CutReport(starts, costs, label)]
    if topology.world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    return decision[0]
