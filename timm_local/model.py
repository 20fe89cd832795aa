"""LocalModel: a plain timm backbone plus the auxiliary heads of one local learning rule."""
from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
import torch.nn as nn

from .engine.sequential import LocalStepOutput, sequential_local_step
from .engine.stage import Backward
from .methods import LocalStage, create_method
from .partition import Partition, partition


class LocalModel(nn.Module):
    """``backbone`` is the untouched timm model; ``heads`` live beside it, never inside it.

    So ``backbone.state_dict()`` has timm's keys and exports/loads like any timm checkpoint,
    and ``forward`` is plain backbone inference (auxiliary heads are training-only).
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: str = "auglocal",
        num_classes: int | None = None,
        input_size: Sequence[int] | None = None,
        **method_kwargs: Any,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = create_method(method, **method_kwargs)
        self.num_classes = int(num_classes if num_classes is not None else backbone.num_classes)
        self.partition: Partition = partition(backbone, input_size=input_size)
        self.stages: list[LocalStage] = self.method.build(self.partition, self.num_classes)
        self.heads = nn.ModuleList([s.head for s in self.stages if s.head is not None])

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def method_config(self) -> dict[str, Any]:
        return self.method.config()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def local_step(
        self, x: torch.Tensor, y: torch.Tensor, backward: Backward | None = None
    ) -> LocalStepOutput:
        """One training forward/backward: each stage's loss is back-propagated as soon as it is
        computed, through ``backward`` (e.g. ``accelerator.backward``), so no gradient crosses a
        block boundary and each stage's graph is freed before the next stage runs.
        """
        return sequential_local_step(self.partition, self.stages, x, y, backward)


def create_backbone(name: str, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **timm_kwargs)``, with an unknown name a clear error listing ours."""
    try:
        return timm.create_model(name, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"unknown model {name!r}: use a timm model name (timm.list_models()) or one of "
                f"ours: {', '.join(timm.list_models('*_cifar'))}"
            ) from None
        raise


def create_local_model(
    model: str | nn.Module,
    method: str = "auglocal",
    *,
    aux_depth: int | None = None,
    tau: float | None = None,
    input_size: Sequence[int] | None = None,
    method_kwargs: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> LocalModel:
    """A :class:`LocalModel` around a timm model (a name for ``timm.create_model`` or an instance).

    ``aux_depth`` is the paper's d (counting the final linear layer), ``tau`` the pyramidal
    coefficient; both are passed only when given, so methods without them accept defaults.
    """
    if isinstance(model, str):
        backbone = create_backbone(model, **timm_kwargs)
    else:
        if timm_kwargs:
            raise TypeError(f"timm arguments {sorted(timm_kwargs)} given with an already built model")
        backbone = model
    kwargs = dict(method_kwargs or {})
    if aux_depth is not None:
        kwargs["aux_depth"] = aux_depth
    if tau is not None:
        kwargs["tau"] = tau
    return LocalModel(backbone, method=method, input_size=input_size, **kwargs)
