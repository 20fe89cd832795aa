"""How the generic cut joins candidate segments into local blocks.

The cut points of :mod:`.graph_cut` split ``forward_features`` at every single-tensor boundary
between timm's blocks. Not every piece is a block worth training on its own: the merge rules join
a piece without a convolution or linear layer (a lone final norm) to the block before it, a piece
with a single one (a stage's downsampling conv, a patch merging) to the block after it -- as the
stage-level modules of the specific families do -- and blocks that share a parameter into one.
The rules see only :class:`Segment` records, so each can be checked on a small graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

from .block_groups import compute_layers

__all__ = ["MERGE_RULES", "Segment", "join_lone_layer_to_next", "join_no_compute_to_neighbour",
           "join_parameter_sharers", "merge_segments", "node_parameters", "segment_of"]


def node_parameters(node: fx.Node, target_of: Callable[[fx.Node], Any]) -> set[int]:
    """Ids of the parameters a node uses: a module call's, or a parameter it reads directly."""
    if node.op == "call_module":
        return {id(p) for p in target_of(node).parameters()}
    if node.op == "get_attr" and isinstance(target_of(node), nn.Parameter):
        return {id(target_of(node))}
    return set()


@dataclass(frozen=True)
class Segment:
    """Body positions ``first``..``last`` (inclusive) of a candidate local block, with what the merge
    rules read: its number of convolution / linear layers and the ids of the parameters it uses."""

    first: int
    last: int
    compute: int
    params: frozenset[int]

    def join(self, later: "Segment") -> "Segment":
        return Segment(self.first, later.last, self.compute + later.compute, self.params | later.params)


def segment_of(body: Sequence[fx.Node], first: int, last: int, target_of: Callable[[fx.Node], Any]) -> Segment:
    """The :class:`Segment` of ``body[first..last]``; ``target_of`` gives a node's module or attribute."""
    nodes = body[first: last + 1]
    compute = sum(compute_layers(target_of(n)) for n in nodes if n.op == "call_module")
    return Segment(first, last, compute, frozenset().union(*(node_parameters(n, target_of) for n in nodes)))


_Rule = Callable[[list[Segment], int], Optional[list[Segment]]]


def _joined(segments: list[Segment], start: int, end: int) -> list[Segment]:
    """``segments`` with ``start``..``end`` (inclusive) joined into one."""
    merged = segments[start]
    for later in segments[start + 1: end + 1]:
        merged = merged.join(later)
    return [*segments[:start], merged, *segments[end + 1:]]


def join_no_compute_to_neighbour(segments: list[Segment], k: int) -> Optional[list[Segment]]:
    """A segment without a convolution or linear layer (a lone final norm, a position embedding)
    is no block: the first one joins the block after it, any other the block before it."""
    if segments[k].compute != 0:
        return None
    return _joined(segments, 0, 1) if k == 0 else _joined(segments, k - 1, k)


def join_lone_layer_to_next(segments: list[Segment], k: int) -> Optional[list[Segment]]:
    """A segment with a single layer after the first (a stage's downsampling conv, a patch merging)
    joins the block after it, as the specific families' stage-level modules do; the last one, with
    no block after it, joins the block before it."""
    if k == 0 or segments[k].compute != 1:
        return None
    return _joined(segments, k - 1, k) if k == len(segments) - 1 else _joined(segments, k, k + 1)


def join_parameter_sharers(segments: list[Segment], k: int) -> Optional[list[Segment]]:
    """A block that uses a parameter a later block uses too (tied weights) absorbs everything up to
    the last such block: a parameter must be trained by one local block."""
    if segments[k].compute == 0 or (k > 0 and segments[k].compute == 1):
        return None  # (not a block: the rules above move it)
    shared = [j for j in range(k + 1, len(segments)) if segments[k].params & segments[j].params]
    return _joined(segments, k, shared[-1]) if shared else None


#: The merge rules, each ``rule(segments, k)`` -> the segments after merging at ``k``, or None.
MERGE_RULES: tuple[_Rule, ...] = (join_no_compute_to_neighbour, join_lone_layer_to_next, join_parameter_sharers)


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Apply the merge rules until none applies, always at the first segment where one does.

    A merge only changes the segments from the merged one on (the segments before it keep their
    layers, and a later block's parameters stay later), so the scan resumes at the merged segment
    instead of starting over.
    """
    k = 0
    while k < len(segments) and len(segments) > 1:
        for rule in MERGE_RULES:
            merged = rule(segments, k)
            if merged is not None:
                k = min(k, _first_changed(segments, merged))
                segments = merged
                break
        else:
            k += 1
    return segments


def _first_changed(before: list[Segment], after: list[Segment]) -> int:
    return next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
