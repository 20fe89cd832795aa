"""Engines run a method's stages; they know nothing about any particular method.

``sequential``: one process, stages in order. ``pipeline``: W processes each owning a
contiguous run of local stages (× R data-parallel replicas), exactly equal to sequential.
What a stage computes is in :mod:`.stage`, shared by both.

``__all__`` is the surface for driving an engine from one's own loop (docs/pipeline.md: the
:class:`PipelineTrainer` on every rank, :func:`launch_local` on one machine) and for a new engine
(the stage step every engine runs, the cut and its costs); the wire format, ownership and
consolidation stay behind it.
"""
from .cut import CutReport, agree_on_cut, balanced_cut, local_stage_costs, segment_ranges, validate_cut
from .launch import free_port, launch_local
from .pipeline import PipelineStepOutput, PipelineTrainer
from .sequential import LocalStepOutput, sequential_local_step
from .stage import Backward, check_finite_losses, default_backward, run_stage, stage_sums
from .topology import PipelineTopology

__all__ = [
    "Backward",
    "CutReport",
    "LocalStepOutput",
    "PipelineStepOutput",
    "PipelineTopology",
    "PipelineTrainer",
    "agree_on_cut",
    "balanced_cut",
    "check_finite_losses",
    "default_backward",
    "free_port",
    "launch_local",
    "local_stage_costs",
    "run_stage",
    "segment_ranges",
    "sequential_local_step",
    "stage_sums",
    "validate_cut",
]
