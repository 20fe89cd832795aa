"""timm's ``VGG`` class (vgg11/13/16/19, with and without BN).

timm keeps VGG's feature extractor as one flat ``features`` Sequential (conv, [BN], ReLU,
[MaxPool], conv, ...). Each conv-[BN]-ReLU, with the max-pool that follows it where VGG has one,
is one local block, as in the paper's VGG13 / VGG19 (every conv layer is a local layer): vgg13_bn
has 10 local blocks and vgg19_bn 16. The first one plays the role of the stem. The network's
own ``pre_logits`` (the 7x7-conv MLP) and classifier are the top.

timm has no VGG block class, so an auxiliary copy is a ``Sequential`` of the primary block's own
layer classes and settings (conv kernel/padding/bias, norm eps/momentum, activation), with the
requested stride on the conv. The max-pool is not copied: AugLocal downsamples an auxiliary
layer by its stride (docs/spec.md §2.5), so a copy of a pooling block downsamples only when the
running deficit asks for it.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vgg import VGG

from ._layers import act_like
from ._registry import FamilyAdapter, register_family


@register_family
class VggFamily(FamilyAdapter):
    """One local block per conv layer of ``features``: conv, its norm and activation, and its pool."""

    name = "vgg"
    model_classes = (VGG,)

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        groups: list[list[int]] = []
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.Conv2d):
                groups.append([i])
            elif not groups:
                raise NotImplementedError(
                    f"vgg adapter: features.{i} ({type(layer).__name__}) comes before the first conv"
                )
            else:
                groups[-1].append(i)
        blocks = []
        for group in groups:
            name = f"features.{group[0]}" if len(group) == 1 else f"features.{group[0]}-{group[-1]}"
            modules = [model.features[i] for i in group]
            blocks.append((name, nn.Sequential(*modules)))
        return blocks

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        conv = block[0]
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"vgg adapter expects a block starting with a conv, got {type(conv).__name__}")
        layers: list[nn.Module] = [
            type(conv)(
                in_chs,
                out_chs,
                kernel_size=conv.kernel_size,
                stride=stride,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=conv.bias is not None,
            )
        ]
        for layer in list(block)[1:]:
            if isinstance(layer, nn.modules.batchnorm._NormBase):
                layers.append(type(layer)(out_chs, eps=layer.eps, momentum=layer.momentum))
            elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
                continue  # downsampling is the stride's job in an auxiliary layer
            elif not any(True for _ in layer.parameters()):
                layers.append(act_like(layer))
            else:
                raise TypeError(f"vgg adapter cannot copy layer {type(layer).__name__} of a VGG block")
        return nn.Sequential(*layers)
