"""timm's ``RegNet`` class: RegNetX / RegNetY (``Bottleneck``) and pre-activation RegNetV/Z-style
models (``PreBottleneck``).

Local blocks, in execution order: ``stem`` (a conv-norm-act), then every block ``s1.b1`` ...
``s4.bN``. RegNetX-400MF (``regnetx_004``) therefore has 1 + 22 = 23 local blocks, the paper's
L (A.4). The model's ``final_conv`` runs at the end of ``forward_features``:

* a 1x1 conv-norm-act (models with ``num_features``): its own local block ``final_conv``, as the
  head conv of the EfficientNet family is;
* an ``Identity`` (RegNetX/Y): nothing to run, so no block;
* a bare activation (``linear_out`` / pre-activation models): parameter-free, so it is folded
  into the last block (``s4.bN+final_conv``) rather than made a local block that could not learn.

Auxiliary copies are timm ``Bottleneck`` / ``PreBottleneck`` blocks with the primary's bottleneck
ratio, group width, SE ratio, shortcut type, activation and norm read back from its modules.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import ConvNormAct
from timm.models.regnet import Bottleneck, PreBottleneck, RegNet

from ._layers import act_layer_of, act_like, norm_layer_like
from ._registry import FamilyAdapter, register_family

_BLOCKS = (Bottleneck, PreBottleneck)


def _shortcut_type(shortcut: nn.Module | None) -> str | None:
    """timm's ``downsample`` argument that builds this kind of projection shortcut (None: identity)."""
    if shortcut is None:
        return ""
    if isinstance(shortcut, nn.Identity):
        return None  # an identity says nothing about how the model projects
    if isinstance(shortcut, nn.Sequential):  # (avg-pool or Identity, 1x1 conv)
        return "avg"
    return "conv1x1"


def _model_shortcut_type(model: nn.Module) -> str:
    """The shortcut type the model uses where a block changes shape (default timm's 'conv1x1').

    A copy needs a projection where the primary block had an identity shortcut, so the type is
    taken from the blocks of the model that do project.
    """
    for m in model.modules():
        if isinstance(m, _BLOCKS):
            kind = _shortcut_type(m.downsample)
            if kind is not None:
                return kind
    return "conv1x1"


@register_family
class RegNetFamily(FamilyAdapter):
    """Stem, every stage block, and ``final_conv`` when it is a conv (see the module docstring)."""

    name = "regnet"
    model_classes = (RegNet,)

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks: list[tuple[str, nn.Module]] = [("stem", model.stem)]
        stage = 1
        while hasattr(model, f"s{stage}"):
            for name, block in getattr(model, f"s{stage}").named_children():
                if not isinstance(block, _BLOCKS):
                    raise NotImplementedError(
                        f"regnet adapter cannot cut s{stage}.{name}: {type(block).__name__} is not a "
                        "RegNet Bottleneck/PreBottleneck; see docs/families.md"
                    )
                blocks.append((f"s{stage}.{name}", block))
            stage += 1
        final = model.final_conv
        if isinstance(final, ConvNormAct):
            blocks.append(("final_conv", final))
        elif not isinstance(final, nn.Identity):
            if any(True for _ in final.parameters()):
                raise NotImplementedError(
                    f"regnet adapter: unexpected final_conv {type(final).__name__} with parameters"
                )
            last_name, last = blocks[-1]
            blocks[-1] = (f"{last_name}+final_conv", nn.Sequential(last, final))
        return blocks

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        if isinstance(block, ConvNormAct):  # final_conv
            return ConvNormAct(
                in_chs,
                out_chs,
                kernel_size=block.conv.kernel_size[0],
                stride=stride,
                norm_layer=norm_layer_like(block.bn, model),
                act_layer=act_layer_of(block.bn),
            )
        if isinstance(block, nn.Sequential):  # last block with the folded final activation
            return nn.Sequential(
                self.make_block_like(model, block[0], in_chs, out_chs, stride), act_like(block[1])
            )
        if isinstance(block, Bottleneck):
            conv1, conv2, norm = block.conv1.conv, block.conv2.conv, block.conv1.bn
            primary_in, primary_out = conv1.in_channels, block.conv3.conv.out_channels
            act_layer = act_layer_of(norm)
            linear_out = isinstance(block.act3, nn.Identity)
        elif isinstance(block, PreBottleneck):
            conv1, conv2, norm = block.conv1, block.conv2, block.norm1
            primary_in, primary_out = conv1.in_channels, block.conv3.out_channels
            act_layer = act_layer_of(norm)
            linear_out = False
        else:
            raise TypeError(f"regnet adapter can copy Bottleneck/PreBottleneck/final_conv, not {type(block).__name__}")
        bottleneck = conv1.out_channels
        se = block.se
        se_ratio = 0.0 if isinstance(se, nn.Identity) else se.fc1.out_channels / primary_in
        kind = _shortcut_type(block.downsample)
        return type(block)(
            in_chs,
            out_chs,
            stride=stride,
            dilation=(conv2.dilation[0], conv2.dilation[0]),
            bottle_ratio=bottleneck / primary_out,
            group_size=bottleneck // conv2.groups,
            se_ratio=se_ratio,
            downsample=kind if kind is not None else _model_shortcut_type(model),
            linear_out=linear_out,
            act_layer=act_layer,
            norm_layer=norm_layer_like(norm, model),
        )
