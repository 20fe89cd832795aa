"""MAN, Momentum Auxiliary Network (Su et al., ECCV 2024), as its official CIFAR code does it.

Official code: JunhaoSu0/MAN, ``Exp on CIFAR-SVHN-STL/networks/resnetInfoPro_MAN.py`` (read to match).
Every local module i but the last gets, on the output h of its last block:

* ``LB_i``: a trained, freshly initialised copy of the *next* module's first block (block e_i + 1),
  made with the partition's copy machinery (the same copies AugLocal's heads are made of);
* ``EMA_i``: a second fresh copy of that block with no gradient, moved after every local backward
  (before the optimizer step, as the official forward does it inside the step) towards the primary
  block's weights: ``ema = ema·m + w·(1 − m)`` for each parameter, with momentum m (0.999, the
  official model's default);
* InfoPro's classifier and decoder on ``y = LB_i(h) + EMA_i(h)`` (so at the next block's width):
  loss = λx·BCE(decoder(y), image) + λy·CE(classifier(y)), with InfoPro's λ schedule over the heads.

The momentum copies are parameters of the head (``requires_grad=False``): checkpoints, resume and the
pipeline's consolidation carry them like any head tensor.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..partition import Partition
from ._shared import InfoProDecoder, module_stages, parameter_pairs
from .auglocal import downsampling_strides
from .base import LocalHead, LocalMethod, LocalStage, classification_loss, register_method
from .infopro import InfoProClassifier, ReconstructionWeights, classifier_width, infopro_conv
from .man_tokens import TOKEN_MOMENTUM, is_token_model, token_module_ends, token_stages
from .modules import LocalModules


def next_block_copy(partition: Partition, end: int) -> nn.Module:
    """A freshly initialised copy of block ``end + 1`` fed with block ``end``'s output (its own input)."""
    j = end + 1
    if partition.copies_keep_shape:
        return partition.make_shaped_copy(j, partition.specs[end])
    stride = downsampling_strides(end, (j,), partition.specs)[0]
    return partition.make_block_like(j, partition.specs[end].out_chs, stride)


class MomentumBlockHead(LocalHead):
    """``LB(h) + EMA(h)`` → InfoPro's classifier (``forward``) and decoder (training only).

    ``primary`` is the backbone block the EMA copy follows. It is kept outside the module tree (a
    tuple), because it belongs to the next local module: it must not appear in this head's parameters,
    state or pipeline ownership.
    """

    def __init__(self, lb: nn.Module, ema: nn.Module, classifier: nn.Module, decoder: InfoProDecoder,
                 lambda_x: float, lambda_y: float, momentum: float, primary: nn.Module, primary_index: int,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.lb = lb
        self.ema = ema.requires_grad_(False)
        self.classifier = classifier
        self.decoder = decoder
        self.lambda_x, self.lambda_y, self.momentum = float(lambda_x), float(lambda_y), float(momentum)
        self.channels_last = channels_last
        self.primary = (primary,)
        self.reads_blocks = (primary_index,)
        parameter_pairs(ema, primary)  # refuse a copy that cannot follow its block, at build time

    def aux_input(self, features: torch.Tensor) -> torch.Tensor:
        y = self.lb(features) + self.ema(features)
        return y.permute(0, 3, 1, 2) if self.channels_last else y

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aux_input(features))

    def local_loss(
        self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.aux_input(features)
        logits = self.classifier(y)
        loss = self.lambda_x * self.decoder.loss(y, inputs) + self.lambda_y * classification_loss(logits, target)
        return loss, logits

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self.training:  # an evaluation pass runs the local step too; the copies move in training only
            return
        m = self.momentum
        for ema, weight in parameter_pairs(self.ema, self.primary[0]):
            ema.copy_(ema * m + weight * (1 - m))  # the official expression, rounding included

    def extra_repr(self) -> str:
        return f"lambda_x={self.lambda_x:.4g}, lambda_y={self.lambda_y:.4g}, momentum={self.momentum}"


@register_method("man")
class MAN(LocalModules, ReconstructionWeights, LocalMethod):
    """Momentum auxiliary network on every local module but the last.

    ``momentum``: the EMA coefficient m (0.999). ``weights`` / ``lambda_x`` / ``lambda_y`` / ``mean`` /
    ``std`` / ``hidden``: InfoPro's (see :class:`~timm_local.methods.infopro.InfoPro`).
    """

    def __init__(
        self,
        momentum: float = 0.999,
        weights: str = "auto",
        lambda_x: Sequence[float] | None = None,
        lambda_y: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 128,
        local_modules: int | None = None,
        local_module_ends: Sequence[int] | None = None,
    ) -> None:
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum (MAN's EMA coefficient) must be in [0, 1], got {momentum!r}")
        self._init_weights(weights, lambda_x, lambda_y, mean, std)
        self._init_modules(local_modules, local_module_ends)
        self.momentum = float(momentum)
        self.hidden = classifier_width(hidden)

    def config(self) -> dict[str, Any]:
        return {"momentum": self.momentum, **self._weights_config(), "hidden": self.hidden, **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        weights, mean, std = self._resolve(partition)
        ends = self.module_ends(partition)

        def make_head(index: int, k: int) -> MomentumBlockHead:
            return self.make_head(partition, index, k, len(ends) - 1, weights, mean, std, num_classes)

        return module_stages(partition, ends, make_head, self.name, channels_first=False)

    def make_head(self, partition: Partition, index: int, k: int, num_heads: int, weights: Any,
                  mean: Sequence[float], std: Sequence[float], num_classes: int) -> MomentumBlockHead:
        """Head ``k`` on block ``index``: copies of block ``index + 1``, then InfoPro's networks at its width."""
        j = index + 1
        spec = partition.specs[j]
        if spec.layout == "NLC":
            raise ValueError(f"method {self.name!r} needs (B, C, H, W) feature maps after its copies, but block "
                             f"{spec.name!r} outputs tokens; use auglocal on this model")
        conv_chs, stride = infopro_conv(partition, j)
        lambda_x, lambda_y = weights.at(k, num_heads)
        return self.head_class(next_block_copy(partition, index), next_block_copy(partition, index),
                               InfoProClassifier(spec.out_chs, conv_chs, stride, num_classes, self.hidden),
                               InfoProDecoder(spec.out_chs, mean, std), lambda_x, lambda_y, self.momentum,
                               partition.blocks[j], j, channels_last=spec.layout == "NHWC")

    head_class = MomentumBlockHead


class ScaledMomentumHead(MomentumBlockHead):
    """MAN++'s head: ``s·LB(h) + (2 − s)·EMA(h)`` with a learnable scalar s (initialised to 1, where it is
    MAN's sum)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.s = nn.Parameter(torch.tensor(1.0))

    def aux_input(self, features: torch.Tensor) -> torch.Tensor:
        y = self.s * self.lb(features) + (2 - self.s) * self.ema(features)
        return y.permute(0, 3, 1, 2) if self.channels_last else y


@register_method("man_pp")
class MANPlusPlus(MAN):
    """MAN++ (JunhaoSu0/MAN_PlusPlus): MAN with a learnable mix s per head.

    On feature maps, its CNN code (``Exp_on_CIFAR-SVHN-STL/networks/resnetInfoPro_MANPP.py``): a stem-level
    head too, the stem being its own local module (whose head copies the first block after it) whatever
    the split. On a model whose blocks all output tokens, its ViT code (:mod:`.man_tokens`).
    ``momentum`` defaults to the variant's own: 0.999 on maps, 0.995 on tokens.
    """

    head_class = ScaledMomentumHead

    def __init__(self, momentum: float | None = None, weights: str = "auto",
                 lambda_x: Sequence[float] | None = None, lambda_y: Sequence[float] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, hidden: int = 128,
                 local_modules: int | None = None, local_module_ends: Sequence[int] | None = None) -> None:
        super().__init__(0.999 if momentum is None else momentum, weights, lambda_x, lambda_y, mean, std, hidden,
                         local_modules, local_module_ends)
        self.momentum_given = momentum

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.momentum_given}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        if not is_token_model(partition):
            return super().build(partition, num_classes)
        momentum = TOKEN_MOMENTUM if self.momentum_given is None else self.momentum

        def copy_block(j: int, source: int) -> nn.Module:
            return partition.make_shaped_copy(j, partition.specs[source])

        return token_stages(partition, self.module_ends(partition), num_classes, momentum, copy_block, self.name)

    def module_ends(self, partition: Partition) -> list[int]:
        if is_token_model(partition):
            if self.local_modules is not None and self.local_module_ends is None:
                ends = token_module_ends(partition, self.local_modules)
                if ends is not None:
                    return ends
            return super().module_ends(partition)
        ends = super().module_ends(partition)
        return ends if ends[0] == 0 else [0, *ends]
