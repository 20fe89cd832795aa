"""AugLocal + InfoPro (paper A.9): AugLocal's auxiliary networks plus InfoPro's reconstruction loss.

Blocks 0..K-2 get AugLocal's G_ℓ (docs/spec.md §2: same selection, pyramidal depth and
downsampling) as the classifier, and InfoPro's decoder on the same block output. The loss is
InfoPro's, λx·BCE + λy·CE, with the weights interpolated over the K-1 heads exactly as in
InfoPro (same presets and overrides); the last D+1 blocks form the final stage as in AugLocal.

Choice (the spec is silent on the weights): InfoPro's schedule, because A.9 combines AugLocal
with InfoPro's objective. Give ``lambda_y=(1, 1)`` and e.g. ``lambda_x=(5, 0.5)`` for
"AugLocal's CE at full weight plus reconstruction".
"""
from __future__ import annotations

from typing import Any, Sequence

from ..partition import Partition, init_like_primary
from ._shared import InfoProDecoder, require_feature_maps
from .auglocal import build_auglocal_head, head_pooling, partition_plans, plan_stages, validate_hparams
from .base import LocalMethod, LocalStage, register_method
from .modules import LocalModules
from .infopro import ReconstructionHead, ReconstructionWeights


@register_method("auglocal_infopro")
class AugLocalInfoPro(LocalModules, ReconstructionWeights, LocalMethod):
    """AugLocal (``aux_depth`` = d, ``tau``) with InfoPro's reconstruction loss and weights."""

    def __init__(
        self,
        aux_depth: int = 3,
        tau: float = 0.5,
        weights: str = "auto",
        lambda_x: Sequence[float] | None = None,
        lambda_y: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        local_modules: int | None = None,
        local_module_ends: Sequence[int] | None = None,
    ) -> None:
        validate_hparams(aux_depth, tau)
        self._init_modules(local_modules, local_module_ends)
        self.aux_depth = aux_depth
        self.tau = float(tau)
        self._init_weights(weights, lambda_x, lambda_y, mean, std)

    def config(self) -> dict[str, Any]:
        return {"aux_depth": self.aux_depth, "tau": self.tau, **self._weights_config(), **self._modules_config()}

    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        weights, mean, std = self._resolve(partition)
        plans = partition_plans(partition, self.aux_depth, self.tau,
                                ends=self.module_ends(partition) if self.modules_given else None)
        require_feature_maps(partition, [p.block for p in plans], self.name)
        pooling = head_pooling(partition)
        heads = []
        for k, plan in enumerate(plans):
            spec = partition.specs[plan.block]
            decoder = InfoProDecoder(spec.out_chs, mean, std, channels_last=spec.layout == "NHWC")
            init_like_primary(decoder)
            lambda_x, lambda_y = weights.at(k, len(plans))
            heads.append(ReconstructionHead(build_auglocal_head(partition, plan, num_classes, pooling=pooling),
                                            decoder, lambda_x, lambda_y))
        return plan_stages(plans, heads, len(partition))
