"""Cut any timm model's ``forward_features`` into local blocks at timm's own block boundaries.

Three facts are combined, each from timm or from the model itself:

* **where the blocks are**: :func:`~.block_groups.parameter_groups`, timm's parameter -> block map;
* **what runs, in which order**: the glue code of ``forward_features`` as an fx graph
  (:func:`~.fx_trace.trace_method`), every module call one node. A call of a container whose
  parameters span several blocks (``stages``, a stage, an ``encoder``) is replaced by its own
  traced body, recursively, until every module call lies inside one block;
* **where a cut is possible**: after a node at which exactly one tensor that depends on the
  input's values is still needed later (the block boundary is a single tensor, never a tuple),
  and no parameter is used on both sides. Values of the input's shape alone may cross too
  (:mod:`.probe_values`). The cut between two consecutive blocks is put as late as possible, so
  parameter-free glue (a position-embedding dropout, a permute, a pool) runs with the block
  before it.

Blocks with no convolution or linear layer (a lone final norm) join the block before them; a
segment with a single one (a stage's downsampling conv, a patch merging) joins the block after
it, as the stage-level modules of the specific families do (:mod:`.merge_rules`). Each local
block is the model's own module when it is exactly one module call, an ``nn.Sequential`` of the
model's modules when it is a plain chain of calls, and otherwise an ``fx.GraphModule`` holding
only the modules and parameters it uses (never the model itself).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .block_groups import parameter_groups
from .fx_trace import TraceFailure, inline_call, trace_method
from .merge_rules import merge_segments, node_parameters, segment_of
from .probe_values import ProbeValues, check_input_shape

__all__ = ["cut_forward_features"]

_NamedBlocks = list[tuple[str, nn.Module]]


class _TracedFeatures:
    """The traced graph of ``forward_features`` and what is known about its nodes."""

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        self.model = model
        groups = parameter_groups(model)
        self.param_group: dict[int, Optional[int]] = {id(p): groups.get(n) for n, p in model.named_parameters()}
        param = next(model.parameters(), None)
        if param is None:
            raise TraceFailure(f"{type(model).__name__} has no parameters to train")
        example = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        self.graph, self.constants = trace_method(model, "forward_features", example=example)
        self._expand()

    # ------------------------------------------------------------------ module facts
    def target_of(self, node: fx.Node) -> Any:
        if node.target in self.constants:
            return self.constants[node.target]
        return _resolve(self.model, node.target)

    def block_groups(self, node: fx.Node) -> set[int]:
        """Blocks whose parameters a module call uses. A parameter read directly (a class token, a
        position embedding) belongs to the block where it is used, whatever group timm gives it."""
        if node.op != "call_module":
            return set()
        params = self.target_of(node).parameters()
        return {g for g in (self.param_group.get(id(p)) for p in params) if g is not None}

    def parameter_ids(self, node: fx.Node) -> set[int]:
        return node_parameters(node, self.target_of)

    # ------------------------------------------------------------------ container expansion
    def _expand(self) -> None:
        """Replace calls of multi-block containers by their bodies until none is left (or can be).

        A container that cannot be opened keeps its blocks as one local block; ``opaque`` says why.
        """
        self.opaque: dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for node in list(self.graph.nodes):
                if node.op == "call_module" and node.target not in self.opaque and len(self.block_groups(node)) > 1:
                    try:
                        inline_call(self.graph, node, self.target_of(node), self.constants)
                        changed = True
                    except TraceFailure as e:
                        self.opaque[node.target] = str(e)
        self.graph.lint()


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class _NodeFacts:
    """What the cut needs to know about one node of the traced graph."""

    position: int  # in the body (the input is -1, the output one past the last body node)
    from_input: bool = False  # computed from the input
    from_input_values: bool = False  # from the input's values, not only from its shape
    holds_parameter: bool = False  # uses a parameter, or is computed from one without reading a shape
    last_use: int = -1  # position of the last node that reads it


class _BlockSplitter:
    """Splits the traced graph into local blocks: its single-tensor cut points, the segments between them,
    and a module for each segment."""

    def __init__(self, traced: _TracedFeatures, input_size: Sequence[int]) -> None:
        self.traced = traced
        self.input_size = tuple(input_size)
        self._probe: Optional[ProbeValues] = None
        nodes = list(traced.graph.nodes)
        self.input = next(n for n in nodes if n.op == "placeholder")
        self.output = next(n for n in nodes if n.op == "output")
        if not isinstance(self.output.args[0], fx.Node):
            kind = "tuple" if isinstance(self.output.args[0], tuple) else "list"
            raise TraceFailure(
                f"{type(traced.model).__name__}.forward_features returns a {kind} of "
                f"{len(self.output.args[0])} tensors, not one tensor")
        self.body = [n for n in nodes if n.op not in ("placeholder", "output")]
        self.facts = {n: _NodeFacts(i) for i, n in enumerate(self.body)}
        self.facts[self.input] = _NodeFacts(-1, from_input=True, from_input_values=True)
        self.facts[self.output] = _NodeFacts(len(self.body))
        for n in self.body:
            inputs = [self.facts[a] for a in n.all_input_nodes]
            facts = self.facts[n]
            facts.from_input = any(a.from_input for a in inputs)
            facts.from_input_values = not _reads_shape(n) and any(a.from_input_values for a in inputs)
            facts.holds_parameter = bool(traced.parameter_ids(n)) or (
                not _reads_shape(n) and any(a.holds_parameter for a in inputs))
        for n in [self.input, *self.body]:
            self.facts[n].last_use = max((self.facts[u].position for u in n.users), default=-1)

    def probe(self) -> ProbeValues:
        if self._probe is None:
            root = {n.target: self.traced.target_of(n)
                    for n in self.traced.graph.nodes if n.op in ("call_module", "get_attr")}
            self._probe = ProbeValues(self.traced.model, self.traced.graph, root, self.input_size)
        return self._probe

    def crossing(self, p: int) -> Optional[fx.Node]:
        """The one tensor from the input's values live after body[p], or None if the cut is not single-valued.

        Besides it, only values that need no input (recomputed after the cut) or that depend on the
        input's *shape* alone (a rotary embedding for the token grid, a grid size: fixed at the probe
        size, see :class:`~.probe_values.ProbeValues`) may be live, and none of them may hold a parameter.
        """
        live = [n for n in [self.input, *self.body[: p + 1]] if self.facts[n].last_use > p]
        if any(self.facts[n].holds_parameter for n in live if not self.facts[n].from_input):
            return None  # a parameter used on both sides
        dependent = [n for n in live if self.facts[n].from_input]
        if len(dependent) == 1 and self.facts[dependent[0]].from_input_values:
            return None if _unpacked(dependent[0]) else dependent[0]
        rest = [n for n in dependent if not self.may_fix_at_probe_value(n)]
        if len(rest) != 1 or rest[0].name not in self.probe().shapes:
            return None
        return rest[0]

    def may_fix_at_probe_value(self, node: fx.Node) -> bool:
        """Whether ``node`` may be fixed at its probe value: it is the same for two different probe
        batches and carries no gradient -- shape-derived tensors computed without parameters (a
        rotary table) and plain Python values (a token grid size a patch embedding returns) -- or it
        is the batch size, which the block after the cut reads off its own input."""
        probe = self.probe()
        if probe.is_batch(node):
            return True
        if not probe.same_at_both_probes(node):
            return False
        if node.name in probe.shapes:  # a tensor
            return not self.facts[node].from_input_values and not self.facts[node].holds_parameter
        return True

    def segments(self) -> list[tuple[int, int]]:
        """Inclusive body ranges of the local blocks, in order."""
        intervals = self._block_intervals()
        if not intervals:
            return []
        cuts: list[int] = []
        last = intervals[0][1]
        for first, end in intervals[1:]:
            valid = [p for p in range(last, first) if self.crossing(p) is not None]
            if valid:
                cuts.append(valid[-1])
            last = end
        ranges = [(a + 1, b) for a, b in zip([-1, *cuts], [*cuts, len(self.body) - 1])]
        return self._merge_structural(ranges)

    def _block_intervals(self) -> list[tuple[int, int]]:
        """Body index span of each block group, overlapping spans merged, in execution order."""
        spans: dict[int, list[int]] = {}
        for n in self.body:
            groups = self.traced.block_groups(n)
            if len(groups) > 1:  # an opaque container: its groups become one block
                merged = min(groups)
                for g in groups:
                    for i in spans.pop(g, []):
                        spans.setdefault(merged, []).append(i)
                groups = {merged}
            for g in groups:
                spans.setdefault(g, []).append(self.facts[n].position)
        ordered = sorted((min(v), max(v)) for v in spans.values())
        merged_spans: list[tuple[int, int]] = []
        for first, end in ordered:
            if merged_spans and first <= merged_spans[-1][1]:
                merged_spans[-1] = (merged_spans[-1][0], max(end, merged_spans[-1][1]))
            else:
                merged_spans.append((first, end))
        return merged_spans

    def _merge_structural(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Join what is not a block to its neighbour, and segments that share a parameter."""
        segments = merge_segments([segment_of(self.body, a, b, self.traced.target_of) for a, b in ranges])
        return [(s.first, s.last) for s in segments]

    # ------------------------------------------------------------------ building the blocks
    def build(self, ranges: list[tuple[int, int]]) -> _NamedBlocks:
        blocks: _NamedBlocks = []
        for k, (a, b) in enumerate(ranges):
            source = self.input if k == 0 else self.crossing(a - 1)
            result = self.output.args[0] if k == len(ranges) - 1 else self.crossing(b)
            name = "stem" if k == 0 else self._name(self.body[a: b + 1])
            blocks.append((name, self._module(source, result, a)))
        return blocks

    def _name(self, nodes: list[fx.Node]) -> str:
        """First and last module of a block, each shortened to its largest ancestor inside the block."""
        owned = set().union(*(self.traced.parameter_ids(n) for n in nodes))
        names: list[str] = []
        for n in nodes:
            if n.op != "call_module" or not self.traced.parameter_ids(n):
                continue
            name = n.target
            while "." in name:
                parent = name.rsplit(".", 1)[0]
                if not {id(p) for p in _resolve(self.traced.model, parent).parameters()} <= owned:
                    break
                name = parent
            if name not in names:
                names.append(name)
        return names[0] if len(names) == 1 else f"{names[0]}+{names[-1]}"

    def _module(self, source: fx.Node, result: fx.Node, start: int) -> nn.Module:
        needed, fixed = self._needed(source, result, start)
        chain = [n for n in needed if n.op == "call_module"]
        if not fixed and len(chain) == len(needed) and all(
            n.args == ((source if i == 0 else chain[i - 1]),) and not n.kwargs for i, n in enumerate(chain)
        ) and chain and chain[-1] is result:
            modules = [self.traced.target_of(n) for n in chain]
            return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        graph = fx.Graph()
        x = graph.placeholder("x")
        device = graph.call_function(getattr, (x, "device"))
        env: dict[fx.Node, Any] = {source: x}
        root: dict[str, Any] = {}
        if any(not self.probe().is_batch(n) for n in fixed):  # probe values suit probe-shaped inputs only
            graph.call_function(check_input_shape, (x, self.probe().shapes[source.name][1:]))
        for k, n in enumerate(fixed):
            value = self.probe().values[n.name]
            if self.probe().is_batch(n):  # the batch size: the input's, not the probe's
                env[n] = graph.call_function(operator.getitem, (graph.call_function(getattr, (x, "shape")), 0))
            elif isinstance(value, torch.Tensor):
                root[f"_fixed{k}"] = value
                env[n] = graph.call_method("to", (graph.get_attr(f"_fixed{k}"), device))
            else:
                env[n] = value
        for n in needed:
            new = graph.node_copy(n, lambda a: env[a])
            # devices the trace read off real tensors follow the block's input instead
            new.args = fx.node.map_aggregate(new.args, lambda a: device if isinstance(a, torch.device) else a)
            new.kwargs = fx.node.map_aggregate(new.kwargs, lambda a: device if isinstance(a, torch.device) else a)
            env[n] = new
            if n.op == "get_attr" and n.target in self.traced.constants:  # follow the input's device
                env[n] = graph.call_method("to", (new, device))
            if n.op in ("call_module", "get_attr"):
                root[n.target] = self.traced.target_of(n)
        graph.output(env[result])
        return fx.GraphModule(root, graph, class_name=f"{type(self.traced.model).__name__}Segment")

    def _needed(self, source: fx.Node, result: fx.Node, start: int) -> tuple[list[fx.Node], list[fx.Node]]:
        """Nodes that compute ``result`` from ``source``, in order, and the shape-fixed values from
        before the block it takes as constants (values that need no input are recomputed)."""
        seen: set[fx.Node] = set()
        fixed: set[fx.Node] = set()
        stack = [result]
        while stack:
            n = stack.pop()
            if n in seen or n in fixed or n is source:
                continue
            if self.facts[n].position < start and self.facts[n].from_input and self.may_fix_at_probe_value(n):
                fixed.add(n)
                continue
            if n is self.input:
                raise TraceFailure("a block needs the network input besides the previous block's output")
            seen.add(n)
            stack.extend(n.all_input_nodes)
        def order(n: fx.Node) -> int:
            return self.facts[n].position

        return sorted(seen, key=order), sorted(fixed, key=order)


def _unpacked(node: fx.Node) -> bool:
    """A value only ever indexed by integers: a tuple of tensors (PiT's (tokens, class tokens)), not one."""
    return bool(node.users) and all(
        u.op == "call_function" and u.target is operator.getitem and type(u.args[1]) is int for u in node.users)


def _reads_shape(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()``: the result depends on the shape, not the values."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return node.op == "call_method" and node.target in ("size", "dim")


def cut_forward_features(model: nn.Module, input_size: Sequence[int]) -> _NamedBlocks:
    """(name, module) of the local blocks of ``model`` for ``(C, H, W)`` inputs; raises
    :class:`TraceFailure` with the reason when it cannot cut the model."""
    splitter = _BlockSplitter(_TracedFeatures(model, input_size), input_size)
    ranges = splitter.segments()
    if len(ranges) < 2:
        traced = splitter.traced
        if traced.opaque:  # the blocks are inside a container that could not be opened
            raise TraceFailure("; ".join(f"its blocks are inside {target}, which cannot be cut: {why}"
                                         for target, why in traced.opaque.items()))
        raise TraceFailure(
            f"forward_features of {type(model).__name__} has no single-tensor boundary between any two of "
            "its blocks (its blocks pass several tensors to each other), so it is one local block"
        )
    return splitter.build(ranges)


