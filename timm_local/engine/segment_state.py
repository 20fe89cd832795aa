"""Per-rank checkpoint files of a pipeline segment: the tensors it owns, tagged with the cut.

Such a file holds one segment's part of the model only, so it is worth something only to the same
segment under the same cut; loading it anywhere else is refused, never half-applied. A checkpoint that
any cut or engine may resume is the consolidated one (the sequential engine's format).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["load_segment_state", "segment_state"]

_SEGMENT_STATE_FORMAT = "timm_local.pipeline_segment/1"


def segment_state(tensors: dict[str, torch.Tensor], cut: Sequence[int], segment: int) -> dict[str, Any]:
    """``tensors`` (this segment's entries of ``model.state_dict()``) with the cut and segment they belong to."""
    return {
        "format": _SEGMENT_STATE_FORMAT,
        "cut": list(cut),
        "segment": segment,
        "model": {name: t.detach() for name, t in tensors.items()},
    }


@torch.no_grad()
def load_segment_state(state: dict[str, Any], tensors: dict[str, torch.Tensor], cut: Sequence[int],
                       segment: int) -> None:
    """Copy a :func:`segment_state` into ``tensors``, after checking that it was written by ``segment`` of
    ``cut`` and holds exactly these entries (nothing is copied otherwise)."""
    if state.get("format") != _SEGMENT_STATE_FORMAT:
        raise ValueError(
            "not a pipeline segment state (PipelineTrainer.state_dict()); load a full LocalModel "
            "state with model.load_state_dict on every rank instead"
        )
    if list(state["cut"]) != list(cut) or state["segment"] != segment:
        raise ValueError(
            f"segment state was saved for segment {state['segment']} of cut {state['cut']}, this rank runs "
            f"segment {segment} of cut {list(cut)}: resume with the same cut (pass cut=) or from a "
            "consolidated full checkpoint"
        )
    missing = sorted(set(tensors) - set(state["model"]))
    unexpected = sorted(set(state["model"]) - set(tensors))
    if missing or unexpected:
        raise KeyError(f"segment state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        t.detach().copy_(state["model"][name])
