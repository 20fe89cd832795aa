"""Record the code a timm model runs *between* its module calls, with torch.fx.

``forward_features`` of a transformer is not a chain of its children: it concatenates a class
token, adds a position embedding, permutes between NCHW and NHWC... To cut such a model into
local blocks the generic family needs that glue code as data. :func:`trace_method` records one
method (``forward_features``, or a container's ``forward``) as an ``fx.Graph`` in which *every*
submodule call is one opaque node, so the modules themselves are never traced: they keep their
own training-mode branches (dropout, drop-path, batch statistics) and need not be traceable.
Only the glue is symbolic, and it is checked to be the same in train and eval mode.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions

from .spec import first_line

__all__ = ["TraceFailure", "first_line", "inline_call", "trace_method", "training_mode"]


class TraceFailure(RuntimeError):
    """The method could not be recorded as glue code around module calls (the reason is the message)."""


class _GlueTracer(fx.Tracer):
    """Every module is a leaf: only the traced method's own code becomes graph nodes.

    timm's registered "no-trace" functions (e.g. position-embedding resampling, whose Python
    branches depend on shapes) stay opaque too; fx wraps them in the traced method's module.
    """

    def __init__(self, method: str, structures: dict[str, Any] | None = None) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.traced_func_name = method
        self.structures = structures or {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A module that returned a tuple in a concrete run gives a tuple of proxies, so glue may
        unpack it (``x, size = embed(x)``; ``x.reshape(B, *size, -1)`` in Twins)."""
        out = super().call_module(m, forward, args, kwargs)
        structure = self.structures.get(self.path_of_module(m)) if self.structures else None
        return _as_tuples(out, structure) if isinstance(structure, tuple) else out


def _as_tuples(proxy: Any, structure: tuple) -> tuple:
    return tuple(_as_tuples(proxy[i], s) if isinstance(s, tuple) else proxy[i] for i, s in enumerate(structure))


def output_structures(module: nn.Module, method: str, example: torch.Tensor) -> dict[str, Any]:
    """Qualified name -> nesting of each submodule's tuple outputs (None for a tensor), from one run."""
    names = {m: n for n, m in module.named_modules() if n}
    seen: dict[str, Any] = {}

    def nest(value: Any) -> Any:
        return tuple(nest(v) for v in value) if isinstance(value, (tuple, list)) else None

    def record(m: nn.Module, args: Any, out: Any) -> None:  # (a hook that returns a value replaces the output)
        seen.setdefault(names[m], nest(out))

    handles = [m.register_forward_hook(record) for m in names]
    try:
        with training_mode(module, False), torch.no_grad():
            getattr(module, method)(example)
    except Exception as e:  # the model itself does not run at this size
        raise TraceFailure(f"{type(module).__name__}.{method} does not run on inputs of shape "
                           f"{tuple(example.shape[1:])} ({type(e).__name__}: {first_line(e)})") from None
    finally:
        for h in handles:
            h.remove()
    return seen


def _defaults(module: nn.Module, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The method's arguments after the input, fixed at their defaults (a local block gets one tensor)."""
    params = list(inspect.signature(getattr(type(module), method)).parameters.values())[2:]
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in overrides]
    if required:
        raise TraceFailure(f"{type(module).__name__}.{method} needs arguments besides its input: {required}")
    return {p.name: overrides.get(p.name, p.default) for p in params}


def _drop_specialised_arguments(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for arguments fixed at their defaults, and fx's checks on them."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        doomed: dict[fx.Node, None] = {}
        frontier = list(ph.users)
        while frontier:
            n = frontier.pop()
            if n.op != "call_function" or n.target not in _CHECKS:
                raise TraceFailure(f"the traced code uses its argument {ph.target!r} beyond its default")
            doomed[n] = None
            frontier.extend(n.users)
        for n in reversed([n for n in graph.nodes if n in doomed]):
            graph.erase_node(n)
        graph.erase_node(ph)


_CHECKS = (torch.fx._symbolic_trace._assert_is_none, torch._assert, operator.eq, operator.is_)


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train/eval mode and restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _trace_once(
    module: nn.Module, method: str, overrides: dict[str, Any], structures: dict[str, Any] | None
) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    before = set(vars(module))
    try:
        tracer = _GlueTracer(method, structures)
        graph = tracer.trace(module, concrete_args=_defaults(module, method, overrides) or None)
    except TraceFailure:
        raise
    except Exception as e:  # fx raises many exception types for untraceable Python code
        raise TraceFailure(f"{type(module).__name__}.{method} cannot be traced with torch.fx "
                           f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        # fx stores the tensor constants it meets on the traced module: take them back off
        added = {k: vars(module)[k] for k in set(vars(module)) - before}
        for k in added:
            delattr(module, k)
    _drop_specialised_arguments(graph)
    return graph, {k: v for k, v in added.items() if isinstance(v, torch.Tensor)}


def trace_method(
    module: nn.Module, method: str = "forward", overrides: dict[str, Any] | None = None,
    example: torch.Tensor | None = None,
) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """``module.<method>(x)`` as (graph, tensor constants); raises :class:`TraceFailure` if it cannot.

    Arguments after ``x`` are fixed at their defaults, or at ``overrides`` (``pre_logits=True``).
    Targets of ``call_module`` / ``get_attr`` nodes are relative to ``module``; ``constants``
    holds the tensors fx had to store as constants (keyed by their ``get_attr`` target). The glue
    is traced in train and in eval mode and must be the same: a segment of it runs in both.
    With an ``example`` input, glue that unpacks a module's tuple output with ``*`` or ``len``
    (Twins) is traced again with the tuples one concrete run of the method shows.
    """
    overrides = dict(overrides or {})
    structures = None
    try:
        with training_mode(module, True):
            graph, constants = _trace_once(module, method, overrides, structures)
    except TraceFailure:
        if example is None:
            raise
        structures = output_structures(module, method, example)  # retry, unpacking tuple outputs
        with training_mode(module, True):
            graph, constants = _trace_once(module, method, overrides, structures)
    with training_mode(module, False):
        eval_graph, _ = _trace_once(module, method, overrides, structures)
    if graph.python_code("self").src != eval_graph.python_code("self").src:
        raise TraceFailure(f"{type(module).__name__}.{method} runs different code in train and eval mode")
    return graph, constants


def inline_call(
    graph: fx.Graph,
    node: fx.Node,
    module: nn.Module,
    constants: dict[str, torch.Tensor],
    overrides: dict[str, Any] | None = None,
) -> None:
    """Replace the call ``node`` of ``module`` (on one tensor) by the module's traced body, in place.

    New constants are added to ``constants`` under fresh names. Raises :class:`TraceFailure` with
    the reason, changing nothing, when the call passes more than one tensor or the body cannot be
    traced or returns several values.
    """
    name = type(module).__name__
    single = len(node.args) == 1 and (isinstance(node.args[0], fx.Node) or (
        isinstance(node.args[0], (tuple, list)) and all(isinstance(a, fx.Node) for a in node.args[0])))
    if not single:  # (one tensor, or one tuple of tensors as PiT's stages pass tokens and class tokens)
        raise TraceFailure(f"{node.target} ({name}) is called with {len(node.args)} positional arguments")
    if any(isinstance(v, fx.Node) for v in fx.node.map_aggregate(node.kwargs, lambda a: a).values()):
        raise TraceFailure(f"{node.target} ({name}) is called with keyword arguments computed from the input")
    overrides = {**node.kwargs, **(overrides or {})}  # constant keyword arguments fix the body's arguments
    accepted = list(inspect.signature(type(module).forward).parameters)[2:]
    if set(overrides) - set(accepted):
        raise TraceFailure(f"{node.target} ({name}) takes keyword arguments its forward does not name")
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        value = node.args[0]
        with graph.inserting_before(node):
            for child, _ in module.named_children():
                value = graph.call_module(f"{node.target}.{child}", (value,))
    else:
        body, body_constants = trace_method(module, "forward", overrides)
        out = next(n for n in body.nodes if n.op == "output").args[0]
        if not (isinstance(out, fx.Node) or (
                isinstance(out, (tuple, list)) and all(isinstance(o, fx.Node) for o in out))):
            raise TraceFailure(f"{node.target} ({name}) returns a structure of values")
        env: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(node):
            for sub in body.nodes:
                if sub.op == "placeholder":
                    env[sub] = node.args[0]
                elif sub.op != "output":
                    new = graph.node_copy(sub, lambda a: env[a])
                    if sub.op == "get_attr" and sub.target in body_constants:
                        new.target = f"_constant{len(constants)}"
                        constants[new.target] = body_constants[sub.target]
                    elif sub.op in ("call_module", "get_attr"):
                        new.target = f"{node.target}.{sub.target}"
                    env[sub] = new
        value = fx.node.map_arg(out, lambda a: env[a])
    _replace(graph, node, value)


def _replace(graph: fx.Graph, node: fx.Node, value: Any) -> None:
    """Replace ``node`` by ``value``: a node, or a tuple of nodes (a body returning several tensors,
    whose integer-indexed uses take the element directly)."""
    if isinstance(value, fx.Node):
        node.replace_all_uses_with(value)
    else:
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and type(user.args[1]) is int:
                user.replace_all_uses_with(value[user.args[1]])
                graph.erase_node(user)
            else:
                user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    graph.erase_node(node)
