"""Engines run a method's stages; they know nothing about any particular method.

``sequential``: one process, stages in order. ``pipeline``: W processes each owning a
contiguous run of local stages (× R data-parallel replicas), exactly equal to sequential.
"""
from .cut import CutReport, balanced_cut, local_stage_costs, segment_ranges
from .launch import free_port, launch_local
from .pipeline import PipelineStepOutput, PipelineTopology, PipelineTrainer
from .sequential import LocalStepOutput, run_stage, sequential_local_step

__all__ = [
    "CutReport",
    "LocalStepOutput",
    "PipelineStepOutput",
    "PipelineTopology",
    "PipelineTrainer",
    "balanced_cut",
    "free_port",
    "launch_local",
    "local_stage_costs",
    "run_stage",
    "segment_ranges",
    "sequential_local_step",
]
