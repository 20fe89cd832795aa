"""Family adapters on real timm models: the paper's A.4 CNNs (MobileNetV2, EfficientNet-B0,
RegNetX-400MF) and its ImageNet backbones (VGG13/VGG19 with BN, ResNet-34/101).

Everything runs at 32 px (the partition probe at 64 px), batch 4, 10 classes, on one CPU
thread: the blocks are timm's real ones at full width, only the images are small. Training and
export of the two biggest models are ``slow``-marked; their cut and copies are tested always.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Iterator

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

import timm_local
from timm_local.methods.auglocal import auglocal_plans
from timm_local.partition import Partition, partition

PROBE = (3, 64, 64)
NUM_CLASSES = 10

# Extra timm kwargs per model. VGG's top (pre_logits, a 7x7-conv MLP of 4096 channels, ~120 M
# parameters) is not a local block; mlp_ratio=1/8 narrows it so the tests stay small without
# touching any local block. timm records it in the model args, so export round-trips it.
MODEL_KWARGS: dict[str, dict] = {
    "mobilenetv2_100": {},
    "efficientnet_b0": {},
    "regnetx_004": {},
    "vgg13_bn": {"mlp_ratio": 0.125},
    "vgg19_bn": {"mlp_ratio": 0.125},
    "resnet34": {},
    "resnet101": {},
}
BIG = {"vgg19_bn", "resnet101"}  # training/export of these is slow-marked
ALL_MODELS = list(MODEL_KWARGS)
TRAIN_MODELS = [pytest.param(m, marks=pytest.mark.slow) if m in BIG else m for m in ALL_MODELS]

# Pinned local-block counts. The paper's L (A.4) counts every conv layer of the feature
# extractor as a local layer: the stem, every building block and, where the model has one,
# the 1x1 head conv. We apply the same rule to timm's models:
#   mobilenetv2_100: stem + 17 blocks + conv_head = 19 = paper L (pytorch-cifar MobileNetV2 has
#                    the same stem, 17 blocks and 320->1280 head conv).
#   efficientnet_b0: stem + 16 blocks + conv_head = 18. The paper's L = 17 is stem + 16 blocks of
#                    the pytorch-cifar EfficientNetB0, which has *no* head conv (320 -> linear);
#                    timm's (the real EfficientNet-B0) has a 320->1280 conv_head in
#                    forward_features, so it is one more local block. No rule that gives
#                    MobileNetV2 19 can give timm's EfficientNet-B0 17 (both have a head conv).
#   regnetx_004:     stem + 22 blocks = 23 = paper L (final_conv is an Identity).
#   vgg13_bn/vgg19_bn: one per conv = 10/16, the reference code's VGG13/VGG19 split.
#   resnet34/resnet101: stem + 16/33 blocks = 17/34, the reference code's ImageNet split.
BLOCK_COUNTS = {
    "mobilenetv2_100": 19,
    "efficientnet_b0": 18,
    "regnetx_004": 23,
    "vgg13_bn": 10,
    "vgg19_bn": 16,
    "resnet34": 17,
    "resnet101": 34,
}
FAMILY = {
    "mobilenetv2_100": "efficientnet",
    "efficientnet_b0": "efficientnet",
    "regnetx_004": "regnet",
    "vgg13_bn": "vgg",
    "vgg19_bn": "vgg",
    "resnet34": "resnet",
    "resnet101": "resnet",
}


@functools.lru_cache(maxsize=None)
def _prototype(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=NUM_CLASSES, **MODEL_KWARGS[name])


def fresh_model(name: str) -> nn.Module:
    """A new timm model (a copy of one cached random init: creating ResNet-101 costs seconds)."""
    return copy.deepcopy(_prototype(name))


def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 3])


def architecture(module: nn.Module, with_top: bool = True) -> list[tuple]:
    """Everything that defines a block's architecture: each submodule's class and settings
    (conv shapes, kernel, stride, groups, padding; norm eps/momentum; activation), in order,
    plus the block class and whether it has a residual skip. Regularisers are left out."""
    out: list[tuple] = []
    if with_top:
        out.append((type(module).__name__, getattr(module, "has_skip", None)))
    for sub in module.modules():
        if sub is module or isinstance(sub, (nn.Sequential, nn.Identity, DropPath, nn.Dropout)):
            continue
        out.append((type(sub).__name__, sub.extra_repr()))
    return out


def test_families_are_listed_sorted_with_the_built_in_ones() -> None:
    families = timm_local.list_families()
    assert {"efficientnet", "regnet", "resnet", "vgg", "cifar_vgg"} <= set(families)
    assert families == sorted(families)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_each_family_cuts_its_models_into_the_pinned_block_counts(name: str) -> None:
    p = partition(fresh_model(name), input_size=PROBE)
    assert p.adapter.name == FAMILY[name]
    assert len(p) == BLOCK_COUNTS[name], p.names
    if FAMILY[name] == "efficientnet":
        assert p.names[0] == "stem" and p.names[-1] == "conv_head"
        assert len(p) == 2 + sum(len(stage) for stage in p.model.blocks)  # stem + blocks + head conv


def test_efficientnet_b0_reductions_follow_spatial_size() -> None:
    """EfficientNet changes channels without changing size (e.g. 80 -> 112 at stride 16, 320 ->
    1280 at the head): AugLocal's downsampling must follow spatial sizes, so an auxiliary layer
    of a block already at the final resolution never downsamples, whatever its channels."""
    p = partition(fresh_model("efficientnet_b0"), input_size=PROBE)
    assert [s.reduction for s in p.specs] == [2, 2, 4, 4, 8, 8] + [16] * 6 + [32] * 6
    assert [s.out_chs for s in p.specs][6:12] == [80, 80, 80, 112, 112, 112]
    for aux_depth in (3, 4, 5, 6):
        for plan in auglocal_plans(p.specs, aux_depth, 0.5):
            needed = math.log2(p.specs[-1].reduction / p.specs[plan.block].reduction)
            assert sum(s == 2 for s in plan.strides) <= needed, plan
            if p.specs[plan.block].reduction == 32:
                assert set(plan.strides) == {1}, plan


@pytest.mark.parametrize("name", ALL_MODELS)
def test_partition_reproduces_forward_features(name: str) -> None:
    model = fresh_model(name).eval()
    p = partition(model, input_size=PROBE)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(p.forward_features(x), model.forward_features(x))
    # Every parameter of the model is in exactly one block or in the top, and the blocks are
    # the model's own modules (training the partition trains the model).
    block_params = [id(q) for b in p.blocks for q in b.parameters()]
    assert len(block_params) == len(set(block_params))
    model_params = {id(q) for q in model.parameters()}
    assert set(block_params) <= model_params
    top = model_params - set(block_params)
    # what is left is the top: (pre_logits +) pooling and classifier
    classifier = model.get_classifier()
    assert {id(q) for q in classifier.parameters()} <= top
    pre_logits = getattr(model, "pre_logits", None)
    extra = {id(q) for q in pre_logits.parameters()} if pre_logits is not None else set()
    assert top == {id(q) for q in classifier.parameters()} | extra


def _expected_architecture(p: Partition, j: int) -> list[tuple]:
    block = p.blocks[j]
    with_top = not isinstance(block, nn.Sequential)
    if p.adapter.name == "vgg":
        # A VGG copy downsamples by its conv stride (docs/spec.md §2.5), not by the max-pool
        # that follows some primary convs; compare with the primary minus its pool, stride 1.
        block = nn.Sequential(*[m for m in block if not isinstance(m, nn.MaxPool2d)])
    return architecture(block, with_top)


def _primary_stride(p: Partition, j: int) -> int:
    return 1 if p.adapter.name == "vgg" else p.specs[j].reduction // p.specs[j - 1].reduction


@pytest.mark.parametrize("name", ALL_MODELS)
def test_block_copies_have_the_primary_architecture(name: str) -> None:
    """A copy of block j built with j's own input width and stride is j's architecture exactly:
    same timm block class, kernel sizes, expansion, groups, SE, norm, activation, shortcut."""
    p = partition(fresh_model(name), input_size=PROBE)
    for j in range(1, len(p)):
        copy_j = p.make_block_like(j, p.specs[j - 1].out_chs, _primary_stride(p, j))
        with_top = not isinstance(p.blocks[j], nn.Sequential)
        assert architecture(copy_j, with_top) == _expected_architecture(p, j), p.names[j]
        assert not any(q is r for q in copy_j.parameters() for r in p.blocks[j].parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_block_copies_take_any_width_and_stride(name: str) -> None:
    """Auxiliary layers get other input widths than the primary block and stride 2 where the
    running deficit asks for it; every block type must honour both exactly."""
    p = partition(fresh_model(name), input_size=PROBE)
    for j in range(1, len(p)):
        for in_chs, stride in ((48, 2), (24, 1)):
            block = p.make_block_like(j, in_chs, stride).eval()
            with torch.no_grad():
                out = block(torch.randn(2, in_chs, 8, 8))
            assert out.shape == (2, p.specs[j].out_chs, 8 // stride, 8 // stride), (p.names[j], in_chs, stride)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_auxiliary_networks_give_logits(name: str) -> None:
    lm = timm_local.create_local_model(fresh_model(name), "auglocal", aux_depth=3, input_size=PROBE)
    p = lm.partition
    plans = auglocal_plans(p.specs, 3, 0.5)
    assert len(lm.heads) == len(plans) == len(p) - 3
    x, _ = batch()
    lm.train()
    with torch.no_grad():
        features = []
        h = x
        for block in p.blocks:
            h = block(h)
            features.append(h)
        for plan, stage in zip(plans, lm.stages):
            head = stage.head
            # the auxiliary layers are copies of the selected primary blocks, in order (same
            # timm block class; composite blocks such as a head conv are checked by architecture
            # in test_block_copies_have_the_primary_architecture)
            assert len(head.layers) == len(plan.selection)
            for layer, j in zip(head.layers, plan.selection):
                if not isinstance(p.blocks[j], nn.Sequential):
                    assert type(layer) is type(p.blocks[j]), (p.names[j], type(layer))
            hidden = head.layers(features[plan.block])
            size = features[plan.block].shape[-1]
            for s in plan.strides:
                size = math.ceil(size / s)
            assert hidden.shape[1:] == (p.specs[plan.selection[-1]].out_chs, size, size)
            logits = head(features[plan.block])
            assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TRAIN_MODELS)
def test_local_step_lowers_every_local_loss(name: str) -> None:
    torch.manual_seed(0)
    lm = timm_local.create_local_model(fresh_model(name), "auglocal", aux_depth=3, input_size=PROBE)
    x, y = batch()
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-4)
    history = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        out = lm.local_step(x, y)
        optimizer.step()
        history.append(torch.stack(out.losses))
    first, last = history[0], history[-1]
    assert len(first) == len(lm.heads) + 1
    assert out.logits.shape == (4, NUM_CLASSES)
    not_lowered = [i for i in range(len(first)) if not last[i] < first[i]]
    assert not not_lowered, f"losses of stages {not_lowered} did not decrease: {first.tolist()} -> {last.tolist()}"


def _methods() -> list[str]:
    return timm_local.list_methods()


@pytest.mark.parametrize("method", _methods())
@pytest.mark.parametrize("name", TRAIN_MODELS)
def test_every_method_trains_every_block(name: str, method: str) -> None:
    """One local step of each registered method (default hyper-parameters): finite losses,
    network logits, and a gradient on every parameter of the backbone (no block left out)."""
    lm = timm_local.create_local_model(fresh_model(name), method, input_size=PROBE)
    x, y = batch()
    out = lm.local_step(x, y)
    assert out.logits.shape == (4, NUM_CLASSES)
    assert all(torch.isfinite(loss) for loss in out.losses)
    # (grad None, not zero: timm zero-initialises the last BN of residual blocks, which makes
    # some first-step gradients exactly zero although the parameter is trained)
    no_grad = [n for n, q in lm.backbone.named_parameters() if q.grad is None]
    assert not no_grad, no_grad[:5]


@pytest.mark.parametrize("name", TRAIN_MODELS)
def test_exported_backbone_reloads_in_timm(name: str, tmp_path) -> None:
    """The trained backbone is a plain timm model: timm's own save/load gives identical logits."""
    lm = timm_local.create_local_model(fresh_model(name), "auglocal", aux_depth=3, input_size=PROBE)
    x, y = batch()
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.01)
    lm.local_step(x, y)
    optimizer.step()  # weights and BN statistics now differ from any fresh init
    lm.eval()
    with torch.no_grad():
        expected = lm(x)
    timm.models.save_for_hf(lm.backbone, tmp_path / "export", safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert type(reloaded) is type(lm.backbone)
    assert set(reloaded.state_dict()) == set(lm.backbone.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_efficientnet_gn", "tf_efficientnet_b0", "resnet50d"])
def test_block_copies_other_family_members(name: str) -> None:
    """Edge/conv-bn-act blocks, group norm, TF 'same' padding, avg-pool shortcuts: copies of
    other members of the families keep the primary architecture too."""
    torch.manual_seed(0)
    p = partition(timm.create_model(name, num_classes=NUM_CLASSES), input_size=PROBE)
    for j in range(1, len(p)):
        copy_j = p.make_block_like(j, p.specs[j - 1].out_chs, _primary_stride(p, j))
        with_top = not isinstance(p.blocks[j], nn.Sequential)
        assert architecture(copy_j, with_top) == _expected_architecture(p, j), p.names[j]
