"""Pool an auxiliary network's output the way the model's own head does (token and channels-last models).

A ViT's auxiliary classifier cannot average-pool a 2-d map: the model pools its tokens its own way
(the class token, or the mean of the patch tokens, then maybe an ``fc_norm``, an attention pool, a
``head_hidden`` layer), and Swin averages a channels-last map. :class:`ModelPooling` runs the
model's own ``forward_head(x, pre_logits=True)`` code -- recorded with torch.fx, module calls
opaque -- on *fresh copies* of the modules it uses, so it pools exactly like the model without
sharing a weight with the network's top. The classifier is never part of it (``pre_logits``).
Where that code cannot be recorded, it falls back to the mean over all non-channel positions.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ..families.copies import fresh_copy
from ..families.fx_trace import TraceFailure, inline_call, trace_method, training_mode
from ..partition import Partition

__all__ = ["HeadPooling", "ModelPooling"]

_PRE_LOGITS = {"pre_logits": True}


class _MeanPooling(nn.Module):
    """Mean over every position of a (B, N, C) or (B, H, W, C) output: the fallback pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(1, x.ndim - 1)))


def _pre_logits_graph(model: nn.Module) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """``forward_head(x, pre_logits=True)`` with head modules that take ``pre_logits`` inlined too
    (timm's ``ClassifierHead`` holds the classifier: its pre-logits path must not call it)."""
    graph, constants = trace_method(model, "forward_head", _PRE_LOGITS)
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op == "call_module" and node.kwargs.get("pre_logits") is True:
                inline_call(graph, node, model.get_submodule(node.target), constants, _PRE_LOGITS)
                changed = True
    if any(n.op == "get_attr" and n.target not in constants for n in graph.nodes):
        raise TraceFailure("forward_head reads parameters directly")
    return graph, constants


class HeadPooling:
    """The model's own pre-logits pooling, recorded once per model; :meth:`make` gives each auxiliary
    head its own fresh modules running that code.

    Why once: recording ``forward_head`` (torch.fx, train and eval mode, inlined sub-heads) costs more than
    the rest of a head's construction, and every auxiliary head of a model pools alike.
    """

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        try:
            self._recorded: tuple[fx.Graph, dict[str, torch.Tensor]] | None = _pre_logits_graph(partition.model)
        except TraceFailure:
            self._recorded = None
        self._width: int | None = None

    def make(self) -> nn.Module:
        """The model's pre-logits pooling on fresh module copies, or :class:`_MeanPooling`."""
        if self._recorded is None:
            return _MeanPooling()
        graph, constants = self._recorded
        model = self.partition.model
        root: dict[str, object] = dict(constants)
        for node in graph.nodes:
            if node.op == "call_module":
                root[node.target] = fresh_copy(model.get_submodule(node.target), model)
        return ModelPooling(fx.GraphModule(root, copy.deepcopy(graph), class_name=f"{type(model).__name__}PreLogits"))

    def width(self, pool: nn.Module) -> int:
        """Width of the pooling's output on the last block's features (one probe, the first time)."""
        if self._width is None:
            spec = self.partition.specs[-1]
            param = next(self.partition.model.parameters())
            with torch.no_grad(), training_mode(pool, False):
                self._width = int(pool(torch.zeros(2, *spec.shape, device=param.device, dtype=param.dtype)).shape[-1])
        return self._width


class ModelPooling(nn.Module):
    """The recorded pre-logits code of the model's head (``pooler``), on its own fresh modules."""

    def __init__(self, pooler: fx.GraphModule) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(x).flatten(1)
