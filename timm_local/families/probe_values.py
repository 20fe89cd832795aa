"""Values of a traced ``forward_features`` on probe inputs, for values that cross a block boundary.

Some glue computes, from the input's *shape* alone, a value every block needs: EVA's rotary table
for the token grid, XCiT's grid size (returned by its patch embedding), the batch size a final
reshape uses. Such a value does not stop a cut: the block after the cut takes it as a constant at
the partition's probe size -- checked to be the same for two different probe batches, and guarded
by the block's input shape -- or, for the batch size, reads it off its own input.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .fx_trace import TraceFailure, training_mode
from .spec import first_line, run_on_probe

__all__ = ["ProbeValues", "check_input_shape"]


def check_input_shape(x: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Guard of a block that holds values fixed at the partition's probe size (see ProbeValues)."""
    if tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"this local block was cut for inputs of shape (B, {', '.join(map(str, expected))}) and got "
            f"{tuple(x.shape)}: build the LocalModel with input_size= the size of the training images")


class ProbeValues:
    """Values of the traced graph on probe inputs of batch 1 and 2, at the partition's input size.

    A value that depends on the input's shape only (a rotary position table for the token grid, a
    grid size passed to every block) may cross a block boundary when it is the same for both batch
    sizes: the block after the cut takes it as a constant, valid for inputs of the probe's size,
    which the block checks (:func:`check_input_shape`).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, root: dict[str, Any], input_size: Sequence[int]) -> None:
        module = fx.GraphModule(root, graph)
        param = next(model.parameters())
        runs = []
        generator = torch.Generator(param.device).manual_seed(0)  # (the global random state stays untouched)
        with training_mode(model, False), torch.no_grad():
            for batch in (1, 2):
                recorder = _Recorder(module)
                x = torch.randn(batch, *input_size, generator=generator, device=param.device).to(param.dtype)
                run_on_probe(model, x, "forward_features", model.forward_features, x)
                try:
                    recorder.run(x)
                except Exception as e:  # the model runs, its recorded glue does not (e.g. it mutates a list)
                    raise TraceFailure(f"the traced forward_features does not run ({type(e).__name__}: "
                                       f"{first_line(e)})") from None
                runs.append(recorder)
        self.values = runs[0].values
        self.shapes = runs[0].shapes
        self._same_at_both = {k for k, v in runs[0].values.items() if _equal(v, runs[1].values.get(k))}
        self._batch_sizes = {k for k, v in runs[0].values.items()
                             if type(v) is int and v == 1 and runs[1].values.get(k) == 2}

    def is_batch(self, node: fx.Node) -> bool:
        """An integer equal to the batch size at both probes (``B = x.shape[0]``)."""
        return node.name in self._batch_sizes

    def same_at_both_probes(self, node: fx.Node) -> bool:
        """The value does not change with the batch size: a candidate for a constant after a cut."""
        return node.name in self._same_at_both


class _Recorder(fx.Interpreter):
    """Keeps non-tensor results and small tensors (the candidates for fixing), and every shape."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
            if out.numel() <= 1 << 20:
                self.values[n.name] = out
        elif isinstance(out, (int, float, bool, tuple, list, torch.Size)) or out is None:
            self.values[n.name] = out
        return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    try:
        return bool(a == b)
    except Exception:  # values without a usable == (nested tensors)
        return False
