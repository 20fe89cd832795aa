"""Engines run a method's stages; they know nothing about any particular method."""
from .sequential import LocalStepOutput, run_stage, sequential_local_step

__all__ = ["LocalStepOutput", "run_stage", "sequential_local_step"]
