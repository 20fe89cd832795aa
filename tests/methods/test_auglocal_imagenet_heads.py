"""AugLocal's ``heads="imagenet"`` option: the authors' ImageNet script, checked on ResNet-34."""
from __future__ import annotations

import math

import pytest
import timm
import torch.nn as nn

import timm_local
from timm_local.config import config_from_dict, load_yaml
from tests.helpers import ROOT

RECIPE = ROOT / "configs" / "imagenet" / "resnet34" / "auglocal_official.yaml"
# ResNet-34's local blocks: the stem (64 channels) and 3/4/6/3 BasicBlocks of 64/128/256/512
WIDTHS = [64] * 4 + [128] * 4 + [256] * 6 + [512] * 3


def basic_block_params(in_chs: int, out_chs: int, stride: int) -> int:
    """3x3 conv + BN, 3x3 conv + BN, and a 1x1 conv + BN shortcut where the shape changes."""
    params = 9 * in_chs * out_chs + 2 * out_chs + 9 * out_chs * out_chs + 2 * out_chs
    if stride != 1 or in_chs != out_chs:
        params += in_chs * out_chs + 2 * out_chs
    return params


def script_head_params(block: int, depth: int = 4, num_classes: int = 1000) -> int:
    """The ImageNet script's auxiliary classifier on ``block``, counted from its rules: the copied
    blocks are all remaining ones or ``round(l + (n-l-1)/depth * i)``; a copy takes stride 2 while
    the running log2 of the width ratio is >= 1; then pool, flatten, Linear(512, classes), no BN1d."""
    n = len(WIDTHS)
    if depth >= n - 1 - block:
        chosen = list(range(block + 1, n))
    else:
        chosen = [round(block + (n - block - 1) / depth * i) for i in range(1, depth + 1)]
    params, pools, in_chs = 0, 0, WIDTHS[block]
    for j in chosen:
        pools += int(math.log2(WIDTHS[j] // in_chs))
        stride = 2 if pools >= 1 else 1
        pools -= stride == 2
        params += basic_block_params(in_chs, WIDTHS[j], stride)
        in_chs = WIDTHS[j]
    return params + 512 * num_classes + num_classes


def official_resnet34() -> timm_local.LocalModel:
    cfg = config_from_dict(load_yaml(RECIPE))
    return timm_local.create_local_model(cfg.model, cfg.method, aux_depth=cfg.aux_depth, tau=cfg.tau,
                                         method_kwargs=cfg.method_kwargs, input_size=(3, 64, 64))


def test_official_recipe_heads_match_the_imagenet_script() -> None:
    lm = official_resnet34()
    assert len(lm.partition) == 17 and len(lm.heads) == 16  # every block but the last
    assert [s.blocks for s in lm.stages] == [[b] for b in range(17)]
    counts = [sum(p.numel() for p in head.parameters()) for head in lm.heads]
    assert counts == [script_head_params(b) for b in range(16)]
    # head 0 by hand: blocks 4, 8, 12, 16 -> BasicBlock 64->128 /2 (230,144), 128->256 /2 (919,040),
    # 256->256 (1,180,672), 256->512 /2 (3,673,088), Linear 512->1000 (513,000)
    assert counts[0] == 6_515_944
    assert not any(isinstance(m, nn.BatchNorm1d) for m in lm.heads.modules())


def test_imagenet_heads_keep_the_depth_rules() -> None:
    """Pyramidal depth runs over the N-1 heads; a head near the end copies all remaining blocks."""
    from timm_local.methods.auglocal import auglocal_plans, pyramid_depths

    lm = official_resnet34()
    plans = auglocal_plans(lm.partition.specs, 5, 0.0, heads="imagenet")
    assert [p.selection for p in plans[-4:]] == [(13, 14, 15, 16), (14, 15, 16), (15, 16), (16,)]
    assert pyramid_depths(17, 5, 0.5, heads="imagenet") == [max(1, round(4 - 1.5 * i / 15)) for i in range(16)]


def test_default_is_unchanged_and_the_option_is_recorded() -> None:
    assert timm_local.create_method("auglocal").config() == {"aux_depth": 3, "tau": 0.5}
    method = timm_local.create_method("auglocal", aux_depth=5, tau=0.0, heads="imagenet")
    assert method.config() == {"aux_depth": 5, "tau": 0.0, "heads": "imagenet"}
    cifar = timm_local.create_local_model(timm.create_model("resnet34", num_classes=10), "auglocal",
                                          aux_depth=5, tau=0.0, input_size=(3, 64, 64))
    assert len(cifar.heads) == 17 - 5  # K - 1 = N - D - 1
    with pytest.raises(ValueError, match="heads must be one of"):
        timm_local.create_method("auglocal", heads="all")
