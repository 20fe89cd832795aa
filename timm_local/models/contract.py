"""The part of timm's model contract that the CIFAR architectures share.

timm's own models each write these methods out; ours share one head layout (``global_pool`` +
``fc``, made by timm's ``create_classifier``) and one way of walking their feature taps, so the
head handling, ``forward_intermediates`` and the pruning bookkeeping live here once. A subclass
says which blocks lead to each feature tap (:meth:`feature_segments`) and how to drop what
follows a tap (:meth:`drop_after_feature`).

Gradient checkpointing recomputes every block except the stem, in ``forward_features`` and
here alike: the stem takes the image, which does not require grad, and timm's re-entrant
checkpoint mode (``TIMM_REENTRANT_CKPT``) would silently give its parameters no gradient.

No ``from __future__ import annotations`` here or in the model files: TorchScript (and
scripting an FX-traced copy) needs real annotation objects on every scripted method.
"""
from typing import Any, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint
from timm.models._features import feature_take_indices  # timm's own index rule (negative, last-n)


class CifarTimmModel(nn.Module):
    """Base of the CIFAR architectures: a pooled linear head and timm's feature API.

    Subclasses build ``feature_info`` (one dict per feature tap, in execution order), then call
    :meth:`init_head`. ``global_pool`` and ``fc`` keep the names, and so the ``state_dict`` keys,
    of timm's ResNet head.
    """

    def init_head(self, num_features: int, num_classes: int, global_pool: str) -> None:
        """Create ``global_pool`` and ``fc`` for ``num_features`` input channels."""
        self.num_features = num_features
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: none); ``global_pool=''`` removes the pooling too.

        ``global_pool=None`` keeps the current pooling, as timm's models do.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        device_dtype = get_device_dtype(self)
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **device_dtype
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def feature_segments(self) -> List[List[nn.Module]]:
        """The blocks, grouped by ``feature_info`` entry: running all of them in order is
        ``forward_features``, and the output of group i is feature i. The stem comes first."""
        raise NotImplementedError

    @torch.jit.ignore
    def drop_after_feature(self, index: int) -> None:
        """Remove every layer that runs after feature ``index`` (``prune_intermediate_layers``)."""
        raise NotImplementedError

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API: the ``feature_info`` maps picked by ``indices``.

        ``indices``: None = all, int n = the last n, a sequence = those (negative from the end).
        ``norm`` has nothing to act on (no final norm layer), as in timm's ResNet.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: the CIFAR models only produce 'NCHW' features.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        segments = self.feature_segments()
        if stop_early:
            segments = segments[: max_index + 1]
        intermediates: List[torch.Tensor] = []
        for index, segment in enumerate(segments):
            for position, block in enumerate(segment):
                is_stem = index == 0 and position == 0
                x = checkpoint(block, x) if self.grad_checkpointing and not is_stem else block(x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last feature in ``indices`` and, by default, the head.

        When layers are dropped the head (sized for the final features) always goes, and
        ``num_features`` becomes the channels of the last kept feature.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        self.drop_after_feature(max_index)
        if prune_end:
            self.num_features = int(self.feature_info[max_index]["num_chs"])
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def build_cifar_model(
    model_cls: Type[CifarTimmModel],
    variant: str,
    pretrained: bool,
    *,
    feature_names: Sequence[str],
    default_out_indices: Sequence[int],
    flatten_sequential: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` with the model's default ``out_indices`` and a clear out-of-range error.

    ``feature_names`` describes the model's ``feature_info`` entries, in order, for that error
    (timm itself fails with a bare IndexError deep inside its feature wrapper).
    """
    out_indices = kwargs.get("out_indices")
    if kwargs.get("features_only") and out_indices is not None:
        try:
            feature_take_indices(len(feature_names), out_indices)
        except AssertionError as err:
            listing = ", ".join(f"{i} = {name}" for i, name in enumerate(feature_names))
            raise ValueError(
                f"{variant}: out_indices={out_indices!r} is out of range ({err}); its features are "
                f"{listing} (negative indices count from the end)."
            ) from None
    feature_cfg = dict(out_indices=tuple(default_out_indices))
    if flatten_sequential:
        feature_cfg["flatten_sequential"] = True
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
