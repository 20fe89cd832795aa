"""The generic cut's merge rules, each on the segments of a small traced graph.

The toy network is a ViT in miniature whose every module call is one node: a patch embedding
(one linear), a position embedding read directly, two two-layer blocks, a lone downsampling
linear, a final norm, and a linear whose weight is tied to the first block's.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from timm_local.families.merge_rules import (
    MERGE_RULES,
    Segment,
    join_lone_layer_to_next,
    join_no_compute_to_neighbour,
    join_parameter_sharers,
    merge_segments,
    segment_of,
)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.zeros(8))
        self.norm0 = nn.LayerNorm(8)
        self.block1 = mlp()
        self.down = nn.Linear(8, 8)
        self.block2 = mlp()
        self.norm = nn.LayerNorm(8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.block1[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.embed(x) + self.pos)
        x = self.down(self.block1(x))
        return self.tied(self.norm(self.block2(x)))


class _EveryModuleALeaf(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return True


@pytest.fixture(scope="module")
def toy() -> dict[str, Segment]:
    """One segment per body node of the traced toy, by node name."""
    model = Toy()
    graph = _EveryModuleALeaf().trace(model)
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]

    def obj(node: fx.Node) -> Any:
        return model.get_submodule(node.target) if node.op == "call_module" else model.get_parameter(node.target)

    return {n.name: segment_of(body, i, i, obj) for i, n in enumerate(body)}


def positions(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.first, s.last) for s in segments]


def test_segments_of_the_traced_graph_count_layers_and_parameters(toy) -> None:
    assert list(toy) == ["embed", "pos", "add", "norm0", "block1", "down", "block2", "norm", "tied"]
    assert [s.compute for s in toy.values()] == [1, 0, 0, 0, 2, 1, 2, 0, 1]
    assert len(toy["pos"].params) == 1 and toy["add"].params == frozenset()
    assert toy["tied"].params & toy["block1"].params  # the tied weight
    joined = toy["block1"].join(toy["down"])
    assert (joined.first, joined.last, joined.compute) == (4, 5, 3)
    assert joined.params == toy["block1"].params | toy["down"].params


def test_no_compute_segment_joins_the_block_before_it_and_a_first_one_the_block_after(toy) -> None:
    first = [toy["add"], toy["norm0"], toy["block1"]]
    assert positions(join_no_compute_to_neighbour(first, 0)) == [(2, 3), (4, 4)]  # (joins the next)
    tail = [toy["block2"], toy["norm"]]
    assert positions(join_no_compute_to_neighbour(tail, 1)) == [(6, 7)]
    assert join_no_compute_to_neighbour(tail, 0) is None  # a block is left alone


def test_lone_layer_joins_the_block_after_it_or_the_last_one_the_block_before(toy) -> None:
    segments = [toy["block1"], toy["down"], toy["block2"], toy["tied"]]
    assert positions(join_lone_layer_to_next(segments, 1)) == [(4, 4), (5, 6), (8, 8)]
    assert positions(join_lone_layer_to_next(segments, 3)) == [(4, 4), (5, 5), (6, 8)]
    assert join_lone_layer_to_next([toy["embed"], toy["block1"]], 0) is None  # the first stays (the stem)
    assert join_lone_layer_to_next(segments, 2) is None


def test_blocks_that_share_a_parameter_become_one(toy) -> None:
    segments = [toy["embed"], toy["block1"], toy["block2"], toy["tied"]]
    assert positions(join_parameter_sharers(segments, 1)) == [(0, 0), (4, 8)]
    assert join_parameter_sharers(segments, 0) is None  # nothing later uses the embedding
    assert join_parameter_sharers(segments, 3) is None  # a lone layer is the other rule's


def test_each_segment_kind_is_moved_by_exactly_one_rule(toy) -> None:
    segments = [toy["embed"], toy["norm0"], toy["block1"], toy["down"], toy["block2"], toy["norm"], toy["tied"]]
    for k in range(len(segments)):
        applied = [rule.__name__ for rule in MERGE_RULES if rule(segments, k) is not None]
        assert len(applied) <= 1, (k, applied)


def test_merge_runs_the_rules_to_a_fixed_point(toy) -> None:
    segments = [toy["embed"], toy["norm0"], toy["block1"], toy["down"], toy["block2"], toy["norm"], toy["tied"]]
    # norm0 joins the stem; down joins block2; the final norm joins block2; the tied linear, a lone
    # last layer, joins block2 too; block1 shares its weight with it, so everything after the stem is one
    assert positions(merge_segments(segments)) == [(0, 3), (4, 8)]
    untied = [toy["embed"], toy["norm0"], toy["block1"], toy["down"], toy["block2"], toy["norm"]]
    assert positions(merge_segments(untied)) == [(0, 3), (4, 4), (5, 7)]
    assert positions(merge_segments([toy["pos"]])) == [(1, 1)]  # one segment stays one block
