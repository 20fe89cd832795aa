"""AugLocal's auxiliary networks, exactly as docs/spec.md §2, and its ``heads="imagenet"`` option (the
authors' ImageNet script, checked on ResNet-34)."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import timm_local
from timm_local.config import config_from_dict, load_yaml
from timm_local.cost import macs_per_sample
from timm_local.methods.auglocal import auglocal_plans, pyramid_depths, uniform_selection

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def resnet110_specs():
    import timm

    return timm_local.partition(timm.create_model("resnet110_cifar")).specs


def test_resnet110_d4_depth_schedule() -> None:
    depths = pyramid_depths(55, aux_depth=4, tau=0.5)
    assert len(depths) == 51  # K = 55 - 3 = 52, blocks 0..50
    assert depths[:25] == [3] * 25 and depths[25:] == [2] * 26  # i=25: round(2.5) = 2 (half to even)


def test_tau_zero_disables_pyramid_and_tau_one_reaches_one() -> None:
    assert set(pyramid_depths(55, 5, 0.0)) == {4}
    depths = pyramid_depths(55, 5, 1.0)
    assert depths[0] == 4 and depths[-1] == 1 and depths == sorted(depths, reverse=True)


def test_uniform_selection_spreads_the_copies_up_to_the_last_block() -> None:
    assert uniform_selection(0, 3, 55) == (18, 36, 54)
    assert uniform_selection(52, 3, 55) == (53, 54)  # fewer blocks left than D: take them all
    assert uniform_selection(10, 1, 55) == (54,)
    for block in range(50):
        assert uniform_selection(block, 2, 55)[-1] == 54


def test_plans_strides_follow_primary_downsampling(resnet110_specs) -> None:
    plans = auglocal_plans(resnet110_specs, aux_depth=4, tau=0.5)
    assert plans[0].selection == (18, 36, 54) and plans[0].strides == (1, 2, 2)
    # block 19 (first of stage 2, 16x16) -> copies of stage-3 blocks: one stride 2 only
    assert all(p.strides.count(2) == 1 for p in plans[19:37])
    # blocks in the last stage need no downsampling
    assert all(set(p.strides) == {1} for p in plans[37:])
    # a single layer spanning two downsamplings gets only one stride 2 (at most one per layer)
    d2 = auglocal_plans(resnet110_specs, aux_depth=2, tau=0.5)
    assert d2[0].selection == (54,) and d2[0].strides == (2,)


def test_resnet32_plans_pinned_by_hand() -> None:
    """The accuracy benchmark's model, worked out from docs/spec.md §2 on paper.

    ResNet-32: N = 16 (stem + 3 stages x 5 blocks at 32/16/8 px). d=4: D = 3, K = 13, blocks 0..11
    get heads, D_i = round(3 - i/11) = 3 for i <= 5 and 2 after; the final module is blocks 12..15.
    """
    import timm

    specs = timm_local.partition(timm.create_model("resnet32_cifar")).specs
    plans = {p.block: p for p in auglocal_plans(specs, aux_depth=4, tau=0.5)}
    assert sorted(plans) == list(range(12))
    assert [plans[i].depth for i in range(12)] == [3] * 6 + [2] * 6
    # block 0 (32 px) -> copies of 5 (32 px), 10 (16 px), 15 (8 px)
    assert (plans[0].selection, plans[0].strides) == ((5, 10, 15), (1, 2, 2))
    # block 6 (first at 16 px), D=2: round(6 + 9/2) = round(10.5) = 10 (half to even), then 15
    assert (plans[6].selection, plans[6].strides) == ((10, 15), (1, 2))
    # block 11 (first at 8 px): no downsampling left
    assert (plans[11].selection, plans[11].strides) == ((13, 15), (1, 1))
    d6 = {p.block: p for p in auglocal_plans(specs, aux_depth=6, tau=0.5)}
    assert [d6[i].depth for i in range(10)] == [5, 5, 5, 4, 4, 4, 4, 3, 3, 3]
    assert (d6[0].selection, d6[0].strides) == ((3, 6, 9, 12, 15), (1, 2, 1, 2, 1))
    d2 = auglocal_plans(specs, aux_depth=2, tau=0.5)
    assert len(d2) == 14 and {p.selection for p in d2} == {(15,)}
    assert [p.strides for p in d2] == [(2,)] * 11 + [(1,)] * 3


def test_built_heads_match_plans() -> None:
    model = timm_local.create_local_model("resnet110_cifar", "auglocal", aux_depth=4, tau=0.5, num_classes=10)
    plans = auglocal_plans(model.partition.specs, 4, 0.5)
    assert len(model.heads) == 51 and len(model.stages) == 52
    assert model.stages[-1].blocks == [51, 52, 53, 54] and model.stages[-1].head is None
    for plan, stage in zip(plans, model.stages):
        head = stage.head
        assert stage.blocks == [plan.block]
        assert len(head.layers) == plan.depth
        chs = [layer.conv2.out_channels for layer in head.layers]
        assert chs == [model.partition.specs[j].out_chs for j in plan.selection]
        assert [layer.conv1.stride[0] for layer in head.layers] == list(plan.strides)
        assert isinstance(head.norm, nn.BatchNorm1d) == (plan.depth == 1)
        assert head.fc.out_features == 10


def test_heads_are_fresh_and_outside_backbone() -> None:
    model = timm_local.create_local_model("resnet20_cifar", aux_depth=3, num_classes=10)
    backbone_params = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_params for p in model.heads.parameters())
    assert set(model.backbone.state_dict()) == set(
        __import__("timm").create_model("resnet20_cifar").state_dict()
    )


def test_resnet32_heads_ending_in_a_downsampling_block_without_bn1d() -> None:
    """docs/accuracy.md: the heads that train slowly at a short budget under the paper's BN1d rule."""
    ending = {}
    for d in range(2, 7):
        model = timm_local.create_local_model("resnet32_cifar", "auglocal", aux_depth=d, tau=0.5, num_classes=10)
        ending[d] = [i for i, h in enumerate(model.heads)
                     if h.layers[-1].conv1.stride == (2, 2) and not isinstance(h.norm, nn.BatchNorm1d)]
    assert ending == {2: [], 3: [0, 1, 2, 3, 4, 5, 6], 4: [0, 1, 6], 5: [], 6: []}


def test_head_hidden_adds_a_vgg_style_classifier_of_that_width() -> None:
    """docs/spec.md §5: the paper's VGG13 auxiliary classifiers have hidden width 512 instead of 4096."""
    plain = timm_local.create_local_model("resnet20_cifar", "auglocal", aux_depth=3, num_classes=10)
    wide = timm_local.create_local_model("resnet20_cifar", "auglocal", aux_depth=3, num_classes=10,
                                         method_kwargs={"head_hidden": 24})
    assert wide.method_config == {"aux_depth": 3, "tau": 0.5, "head_hidden": 24}
    assert plain.method_config == {"aux_depth": 3, "tau": 0.5}  # old checkpoints keep matching
    assert not any(".mlp." in k for k in plain.state_dict())
    for head in wide.heads:
        chs = head.layers[-1].conv2.out_channels
        linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(chs, 24), (24, 24)]
        assert (head.fc.in_features, head.fc.out_features) == (24, 10)
    # the extra cost is exactly the two hidden layers and the wider classifier, per head
    extra = sum(h.layers[-1].conv2.out_channels * 24 + 24 * 24 + 24 * 10 - h.layers[-1].conv2.out_channels * 10
                for h in wide.heads)
    gap = macs_per_sample(wide, (3, 32, 32))["gmacs"] - macs_per_sample(plain, (3, 32, 32))["gmacs"]
    assert gap * 1e9 == pytest.approx(extra, rel=1e-6)
    out = wide.local_step(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert all(h.shape == (4, 10) for h in out.head_logits if h is not None)


@pytest.mark.parametrize("rule", ["paper", "always", "never"])
def test_head_norm_rule_places_batchnorm1d_before_the_classifier(rule) -> None:
    model = timm_local.create_local_model("resnet32_cifar", "auglocal", aux_depth=4, tau=0.5, num_classes=10,
                                          method_kwargs={"head_norm": rule})
    plans = auglocal_plans(model.partition.specs, 4, 0.5)
    has_bn = [isinstance(h.norm, nn.BatchNorm1d) for h in model.heads]
    expected = {"paper": [p.depth == 1 for p in plans], "always": [True] * len(plans), "never": [False] * len(plans)}
    assert has_bn == expected[rule]
    # the copied blocks are the same whatever the rule: only the classifier's input changes
    assert [len(h.layers) for h in model.heads] == [p.depth for p in plans]
    assert ("head_norm" in model.method_config) == (rule != "paper")
    x = model.heads[0](torch.randn(3, 16, 32, 32))
    assert x.shape == (3, 10)


# docs/spec.md §4, Table 2: GMACs per 32x32 image, ResNet-110, tau = 0.5
PAPER_GMACS = {None: 0.25, 2: 0.63, 3: 0.69, 4: 0.80, 5: 0.98, 6: 1.13}


@pytest.mark.parametrize("aux_depth", [None, 2, 3, 4, 5, 6])
def test_resnet110_macs_match_paper(aux_depth) -> None:
    method = "bp" if aux_depth is None else "auglocal"
    model = timm_local.create_local_model("resnet110_cifar", method, aux_depth=aux_depth, tau=0.5 if aux_depth else None, num_classes=10)
    macs = macs_per_sample(model, (3, 32, 32))
    assert macs["gmacs"] == pytest.approx(PAPER_GMACS[aux_depth], rel=0.025)
    assert macs["gmacs_train"] == macs["gmacs"]  # AugLocal has no extra loss networks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="auglocal", aux_depth=1), "aux_depth"),
        (dict(method="auglocal", aux_depth=2.5), "aux_depth"),
        (dict(method="auglocal", tau=1.5), "tau"),
        (dict(method="auglocal", tau=-0.1), "tau"),
        (dict(method="auglocal", aux_depth=16), "aux_depth <= 15"),
        (dict(method="auglocal", method_kwargs={"head_hidden": -1}), "head_hidden.*integer >= 0"),
        (dict(method="auglocal", method_kwargs={"head_norm": "sometimes"}), "head_norm must be one of"),
        (dict(method="no_such_method"), "unknown method 'no_such_method'; registered methods: .*auglocal"),
        (dict(method="bp", aux_depth=3), "does not accept"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        timm_local.create_local_model("resnet32_cifar", num_classes=10, **kwargs)


def test_an_unknown_model_name_is_refused_listing_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet_nope'.*resnet110_cifar"):
        timm_local.create_local_model("resnet_nope")


# ------------------------------------------------------------------------------------------------
# heads="imagenet": the authors' ImageNet script
# ------------------------------------------------------------------------------------------------
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


def test_the_default_heads_are_unchanged_and_the_imagenet_option_is_recorded() -> None:
    assert timm_local.create_method("auglocal").config() == {"aux_depth": 3, "tau": 0.5}
    method = timm_local.create_method("auglocal", aux_depth=5, tau=0.0, heads="imagenet")
    assert method.config() == {"aux_depth": 5, "tau": 0.0, "heads": "imagenet"}
    cifar = timm_local.create_local_model(timm.create_model("resnet34", num_classes=10), "auglocal",
                                          aux_depth=5, tau=0.0, input_size=(3, 64, 64))
    assert len(cifar.heads) == 17 - 5  # K - 1 = N - D - 1
    with pytest.raises(ValueError, match="heads must be one of"):
        timm_local.create_method("auglocal", heads="all")
