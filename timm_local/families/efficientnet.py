"""timm's ``EfficientNet`` class: EfficientNet-B0..B8, MobileNetV2, MNASNet, FBNet, EfficientNetV2...

Local blocks, in execution order (docs/spec.md §1, §4 A.4):

* ``stem``: ``conv_stem`` + ``bn1``;
* every block of ``blocks`` (depthwise-separable, inverted residual, edge residual, conv-bn-act),
  one local block each;
* ``conv_head``: ``conv_head`` + ``bn2``, the 1x1 head convolution, when the model has one.

Why the head convolution is a local block of its own: it is a full conv-BN-act layer of the
feature extractor (timm runs it in ``forward_features``), exactly like the stem, and counting
both is what gives the paper's L for MobileNetV2 (stem + 17 blocks + head conv = 19). The
paper's EfficientNet-B0 (the pytorch-cifar model, L = 17) has no head convolution at all, while
timm's ``efficientnet_b0`` does, so timm's gets one more local block (18); see
tests/families/test_adapters.py for the pinned counts.

Auxiliary copies are built with timm's own block classes, with the configuration read back from
the primary block (kernel sizes, expansion ratio, group size, SE reduction, activation, norm and
its eps/momentum, padding type, skip rule), so a copy with the primary's own input width and
stride has exactly the primary's architecture (checked block by block in the tests).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch.nn as nn
from timm.models._efficientnet_blocks import (
    ConvBnAct,
    CondConvResidual,
    DepthwiseSeparableConv,
    EdgeResidual,
    InvertedResidual,
    SqueezeExcite,
)
from timm.models.efficientnet import EfficientNet

from ._layers import act_layer_of, norm_layer_like, pad_type_of
from ._registry import FamilyAdapter, register_family

_SUPPORTED_BLOCKS = (DepthwiseSeparableConv, InvertedResidual, EdgeResidual, ConvBnAct)


def _group_size(conv: nn.Conv2d) -> int:
    """timm's ``group_size`` argument for a conv: 0 = dense conv, else channels per group (1 = depthwise)."""
    return 0 if conv.groups == 1 else conv.in_channels // conv.groups


def _stride(conv: nn.Conv2d, aa: nn.Module) -> int:
    """The block's stride: on the conv, or on its anti-aliasing layer when it has one."""
    if not isinstance(aa, nn.Identity):
        return int(getattr(aa, "stride", 2))
    return int(conv.stride[0])


def _aa_layer(aa: nn.Module) -> type[nn.Module] | None:
    return None if isinstance(aa, nn.Identity) else type(aa)


def _se_layer_like(se: nn.Module) -> functools.partial | None:
    """An SE factory ``f(chs, act_layer=...)`` that reduces like ``se`` does, or None if no SE.

    The reduction is kept as a ratio of the SE's own input channels (the builder's
    ``se_ratio / exp_ratio`` for inverted residuals), so it scales with the copy's width; the
    SE activation and gate are the primary's.
    """
    if isinstance(se, nn.Identity):
        return None
    if type(se) is not SqueezeExcite:
        raise NotImplementedError(
            f"efficientnet adapter cannot copy attention layer {type(se).__name__}; only timm's "
            "EfficientNet SqueezeExcite is supported"
        )
    return functools.partial(
        SqueezeExcite,
        rd_ratio=se.conv_reduce.out_channels / se.conv_reduce.in_channels,
        force_act_layer=type(se.act1),
        gate_layer=type(se.gate),
    )


def _noskip(block: nn.Module, in_chs: int, out_chs: int, stride: int) -> bool:
    """True when the primary could have had a skip (same shape) but was built without one."""
    return in_chs == out_chs and stride == 1 and not block.has_skip


def _unsupported(model: nn.Module) -> Optional[str]:
    """Why this adapter cannot cut ``model`` (a block type it cannot copy), or None."""
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            if not isinstance(block, _SUPPORTED_BLOCKS) or isinstance(block, CondConvResidual):
                return (f"efficientnet adapter cannot cut blocks.{i}.{j}: {type(block).__name__} is not "
                        f"supported (supported: {', '.join(c.__name__ for c in _SUPPORTED_BLOCKS)}); "
                        "see docs/families.md to register an adapter that handles it")
            if getattr(block, "conv_s2d", None) is not None:
                return f"efficientnet adapter cannot copy blocks.{i}.{j}: space-to-depth blocks are not supported"
    if isinstance(model.conv_head, nn.Identity) and not isinstance(model.bn2, nn.Identity):
        return "efficientnet adapter: a bn2 without conv_head is not supported"
    return None


@register_family
class EfficientNetFamily(FamilyAdapter):
    """Stem, every block of ``blocks``, and the head conv (see the module docstring for why)."""

    name = "efficientnet"
    model_classes = (EfficientNet,)

    def supports(self, model: nn.Module) -> bool:
        """Models of the block types this adapter can copy; others (CondConv, space-to-depth) go generic."""
        return _unsupported(model) is None

    def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        reason = _unsupported(model)
        if reason is not None:  # reached only by a direct call: partition() asks supports() first
            raise NotImplementedError(reason)
        blocks: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
        blocks += [(f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
        if not isinstance(model.conv_head, nn.Identity):
            blocks.append(("conv_head", nn.Sequential(model.conv_head, model.bn2)))
        return blocks

    def make_block_like(
        self, model: nn.Module, block: nn.Module, in_chs: int, out_chs: int, stride: int
    ) -> nn.Module:
        pad_type = pad_type_of(model)
        if isinstance(block, nn.Sequential):  # the head conv: conv_head + bn2
            return ConvBnAct(in_chs, out_chs, stride=stride, pad_type=pad_type, **_head_conv_args(block, model))
        for block_class, read_args in _COPY_ARGS.items():
            if isinstance(block, block_class):
                return block_class(in_chs, out_chs, stride=stride, pad_type=pad_type, **read_args(block, model))
        raise TypeError(
            f"efficientnet adapter can copy {', '.join(c.__name__ for c in _SUPPORTED_BLOCKS)} and the "
            f"head conv, not {type(block).__name__}"
        )


# Each reader returns the constructor arguments of its block class besides the widths, the stride
# and the padding type, read back from the primary block.

def _conv_args(conv: nn.Conv2d, kernel_arg: str) -> dict[str, Any]:
    """Kernel size (under the block class's own keyword), dilation and group size of the main conv."""
    return {kernel_arg: conv.kernel_size[0], "dilation": conv.dilation[0], "group_size": _group_size(conv)}


def _layer_args(block: nn.Module, model: nn.Module) -> dict[str, Any]:
    """Activation, norm and anti-aliasing layers of a block, from its first norm-act and its ``aa``."""
    return {"act_layer": act_layer_of(block.bn1), "norm_layer": norm_layer_like(block.bn1, model),
            "aa_layer": _aa_layer(block.aa)}


def _head_conv_args(block: nn.Sequential, model: nn.Module) -> dict[str, Any]:
    conv, norm = block[0], block[1]
    return {**_conv_args(conv, "kernel_size"), "act_layer": act_layer_of(norm),
            "norm_layer": norm_layer_like(norm, model)}


def _inverted_residual_args(block: InvertedResidual, model: nn.Module) -> dict[str, Any]:
    primary_in = block.conv_pw.in_channels
    return {
        **_conv_args(block.conv_dw, "dw_kernel_size"),
        "noskip": _noskip(block, primary_in, block.conv_pwl.out_channels, _stride(block.conv_dw, block.aa)),
        "exp_ratio": block.conv_pw.out_channels / primary_in,
        "exp_kernel_size": block.conv_pw.kernel_size[0],
        "pw_kernel_size": block.conv_pwl.kernel_size[0],
        **_layer_args(block, model),
        "se_layer": _se_layer_like(block.se),
    }


def _depthwise_separable_args(block: DepthwiseSeparableConv, model: nn.Module) -> dict[str, Any]:
    primary_in = block.conv_dw.in_channels
    return {
        **_conv_args(block.conv_dw, "dw_kernel_size"),
        "noskip": _noskip(block, primary_in, block.conv_pw.out_channels, _stride(block.conv_dw, block.aa)),
        "pw_kernel_size": block.conv_pw.kernel_size[0],
        "pw_act": block.has_pw_act,
        **_layer_args(block, model),
        "se_layer": _se_layer_like(block.se),
    }


def _edge_residual_args(block: EdgeResidual, model: nn.Module) -> dict[str, Any]:
    primary_in = block.conv_exp.in_channels
    conv_exp = block.conv_exp
    return {
        **_conv_args(conv_exp, "exp_kernel_size"),
        # timm counts EdgeResidual groups on the expanded (output) width
        "group_size": 0 if conv_exp.groups == 1 else conv_exp.out_channels // conv_exp.groups,
        "noskip": _noskip(block, primary_in, block.conv_pwl.out_channels, _stride(conv_exp, block.aa)),
        "exp_ratio": conv_exp.out_channels / primary_in,
        "pw_kernel_size": block.conv_pwl.kernel_size[0],
        **_layer_args(block, model),
        "se_layer": _se_layer_like(block.se),
    }


def _conv_bn_act_args(block: ConvBnAct, model: nn.Module) -> dict[str, Any]:
    primary_in, primary_out = block.conv.in_channels, block.conv.out_channels
    # A skip is only visible when the primary's shapes allow one; otherwise keep timm's default.
    allows_skip = primary_in == primary_out and _stride(block.conv, block.aa) == 1
    return {**_conv_args(block.conv, "kernel_size"), "skip": block.has_skip if allows_skip else False,
            **_layer_args(block, model)}


#: timm block class -> the reader of its constructor arguments (checked in this order, as a subclass
#: of one is copied as that class).
_COPY_ARGS: dict[type[nn.Module], Callable[[Any, nn.Module], dict[str, Any]]] = {
    InvertedResidual: _inverted_residual_args,
    DepthwiseSeparableConv: _depthwise_separable_args,
    EdgeResidual: _edge_residual_args,
    ConvBnAct: _conv_bn_act_args,
}
