"""What a local learning rule is: a partition of the blocks into stages, each with a head and a loss.

Methods do not know engines: they return :class:`LocalStage` objects, and any engine
(sequential, pipelined) runs them. The last stage has ``head=None`` and is trained by the
network's own top (pooling + classifier) and cross-entropy.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..partition import Partition
from ..registry import Registry


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class labels, or against class distributions (label smoothing, mixup/cutmix).

    Every local loss and the network's own go through this one function, so a recipe's targets reach
    them all alike. Soft targets use timm's ``SoftTargetCrossEntropy`` (what timm's train.py uses with
    mixup or smoothing); labels keep ``F.cross_entropy``, bit for bit the paper's loss.
    """
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits, target)


class LocalHead(nn.Module):
    """An auxiliary network and its local loss.

    ``forward(h)`` is the auxiliary *classifier* (what the paper counts in its MACs row);
    ``local_loss`` is everything that runs in training, which for some baselines adds extra
    networks (a reconstruction decoder, a similarity conv). The default loss is cross-entropy.
    """

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, logits or None). ``inputs`` is the network input, for reconstruction losses."""
        logits = self(features)
        return classification_loss(logits, target), logits

    def cascade_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of a cascade stage's second path (:attr:`LocalStage.cascade`), on features computed by
        the previous stage's blocks and this stage's; :meth:`local_loss` by default."""
        return self.local_loss(features, target, inputs)

    def after_backward(self) -> None:
        """Called by every engine right after this head's loss was back-propagated, before the optimizer
        step: the place for state that follows the network's weights without a gradient (MAN's
        momentum copies). Nothing by default."""


@dataclass
class LocalStage:
    """Consecutive primary blocks (a local module) trained by one local loss.

    ``checkpoint`` asks the engine to recompute the blocks' activations in backward (the
    gradient-checkpointing memory baseline); it changes memory, never gradients.
    """

    blocks: list[int]
    head: LocalHead | None = None
    checkpoint: bool = False
    #: HPFF's cascade, as (own weight, cascade weight): the stage's loss is own·(its loss on its own detached
    #: input) + cascade·(its cascade loss on the previous stage's blocks and its own, run again from the
    #: previous stage's detached input) -- the one loss allowed to reach exactly one module back.
    cascade: tuple[float, float] | None = None
    #: False for a stage with no loss of its own (HPFF's first module): it runs forward only and is
    #: trained by the next stage's cascade.
    has_loss: bool = True


class LocalMethod(ABC):
    """A local learning rule. Subclasses take their hyper-parameters in ``__init__``."""

    name: ClassVar[str]
    #: Why the method's losses need class labels, if they cannot take class distributions (label smoothing,
    #: mixup/cutmix); None: every loss takes them.
    labels_only: ClassVar[str | None] = None

    @abstractmethod
    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        """Group the partition's blocks into stages and build their heads."""

    def config(self) -> dict[str, Any]:
        """Hyper-parameters, for checkpoints and exported metadata."""
        return {}


_METHODS: Registry[str, type[LocalMethod]] = Registry(
    lambda name, known: ValueError(f"unknown method {name!r}; registered methods: {', '.join(known)}"))
_M = TypeVar("_M", bound=type[LocalMethod])


def register_method(name: str) -> Callable[[_M], _M]:
    """Class decorator adding a method to the registry under ``name``."""

    def decorator(cls: _M) -> _M:
        cls.name = name
        return _METHODS.register(name, cls)

    return decorator


def list_methods() -> list[str]:
    return _METHODS.names()


def _method_class(name: str) -> type[LocalMethod]:
    """The registered class of method ``name``, or an error listing the registered methods."""
    return _METHODS.lookup(name)


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters method ``name`` declares, with their defaults: its constructor's signature.

    A method declares what it takes by its ``__init__`` parameters; callers route their settings by this
    (e.g. the paper's ``aux_depth`` / ``tau`` go only to methods that declare them), never by trying
    a construction and reading a ``TypeError``, which a real error inside a constructor would fake.
    """
    signature = inspect.signature(_method_class(name).__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create_method(name: str, **kwargs: Any) -> LocalMethod:
    """Instantiate a registered method; hyper-parameters it does not declare are an error."""
    cls = _method_class(name)
    declared = method_hyperparameters(name)
    unknown = sorted(set(kwargs) - set(declared))
    if unknown:
        takes = ", ".join(sorted(declared)) or "no hyper-parameters"
        raise TypeError(f"method {name!r} does not accept {unknown}; it takes: {takes}")
    return cls(**kwargs)


def single_stage_for_all(partition: Partition, checkpoint: bool = False) -> list[LocalStage]:
    """End-to-end training: every block in one stage under the network's own loss."""
    return [LocalStage(blocks=list(range(len(partition))), head=None, checkpoint=checkpoint)]
