"""Every model timm_local registers honours timm's model contract, checked the way timm checks its own.

The checks follow timm's documented API (pretrained_cfg fields, ``reset_classifier``,
``features_only`` / ``feature_info``, ``forward_intermediates`` / ``prune_intermediate_layers``,
``set_grad_checkpointing``, ``group_matcher``, FX and TorchScript), on real models at their
32x32 input size; each asserts shapes or values, never only that a call returned.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import group_parameters, model_entrypoint

import timm_local  # noqa: F401  (registers the models)
from timm_local.families import adapter_for

OURS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("timm_local."))
EXPECTED = {"resnet20_cifar", "resnet32_cifar", "resnet56_cifar", "resnet110_cifar", "vgg19_cifar"}
BATCH = 2


def test_discovery_finds_every_registered_model() -> None:
    """The parametrisation below is not silently empty (or missing a model)."""
    assert set(OURS) == EXPECTED


def _create(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _input(model_or_name: object) -> torch.Tensor:
    cfg = (
        timm.models.get_pretrained_cfg(model_or_name).to_dict()
        if isinstance(model_or_name, str)
        else model_or_name.pretrained_cfg
    )
    torch.manual_seed(1)
    return torch.randn(BATCH, *cfg["input_size"])


def _map_shape(info: dict, x: torch.Tensor) -> tuple[int, ...]:
    """Shape a feature must have: channels from feature_info, spatial size input / reduction."""
    r = info["reduction"]
    return (x.shape[0], info["num_chs"], math.ceil(x.shape[2] / r), math.ceil(x.shape[3] / r))


@pytest.mark.parametrize("name", OURS)
def test_pretrained_cfg_resolves_to_the_model(name: str) -> None:
    model = _create(name)
    cfg = model.pretrained_cfg
    x = _input(model)
    modules = dict(model.named_modules())

    assert cfg["input_size"][0] == model.in_chans
    assert len(cfg["mean"]) == len(cfg["std"]) == model.in_chans and all(s > 0 for s in cfg["std"])
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bilinear", "bicubic", "nearest")
    first = modules[cfg["first_conv"]]
    assert isinstance(first, nn.Conv2d) and first.in_channels == model.in_chans
    assert modules[cfg["classifier"]] is model.get_classifier() and model.get_classifier(name_only=True) == "fc"
    assert model.get_classifier().out_features == model.num_classes == cfg["num_classes"]
    assert model.get_classifier().in_features == model.head_hidden_size

    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (BATCH, model.num_features, *cfg["pool_size"])
        assert model.forward_head(features, pre_logits=True).shape == (BATCH, model.head_hidden_size)
        assert torch.equal(model(x), model.forward_head(features))


@pytest.mark.parametrize("name", OURS)
def test_reset_classifier_removes_and_restores_pooling(name: str) -> None:
    model = _create(name)
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)

        model.reset_classifier(0, "")  # no classifier, no pooling: the unpooled map
        assert isinstance(model.get_classifier(), nn.Identity)
        assert model.head_hidden_size == model.num_features
        assert torch.equal(model(x), features)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)

        model.reset_classifier(0, "avg")  # pooled features, no classifier
        assert torch.allclose(model(x), features.mean((2, 3)), atol=1e-6)

        model.reset_classifier(5, "catavgmax")  # pooling doubles the width the classifier sees
        assert model.head_hidden_size == 2 * model.num_features
        assert model.get_classifier().in_features == 2 * model.num_features
        assert model(x).shape == (BATCH, 5)

        model.reset_classifier(3)  # None keeps the current pooling
        assert model.global_pool.pool_type == "catavgmax" and model(x).shape == (BATCH, 3)


def test_headline_resnet110_features_and_unpooled_map() -> None:
    """The issue's headline: three stage maps with feature_info's channels/reductions; an unpooled map."""
    features = _create("resnet110_cifar", features_only=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
    assert features.feature_info.channels() == [16, 32, 64]
    assert features.feature_info.reduction() == [1, 2, 4]
    assert [tuple(m.shape) for m in maps] == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]

    model = _create("resnet110_cifar")
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == (1, 64, 8, 8)


@pytest.mark.parametrize("name", OURS)
def test_features_only_default_out_indices(name: str) -> None:
    """Default out_indices: one map per stride (CIFAR ResNets: their three stages), equal to the model's."""
    features = _create(name, features_only=True)
    model = _create(name)
    info = model.feature_info
    strides = [i["reduction"] for i in info]
    default = features.feature_info.out_indices
    # every stride once, the deepest tap of each (the ResNet stem shares layer1's stride 1)
    assert list(default) == [max(i for i, s in enumerate(strides) if s == stride) for stride in sorted(set(strides))]
    if name.startswith("resnet"):
        assert list(default) == [1, 2, 3]

    x = _input(name)
    with torch.no_grad():
        maps = features(x)
        reference = model.forward_intermediates(x, indices=list(default), intermediates_only=True)
    assert len(maps) == len(default)
    assert features.feature_info.channels() == [info[i]["num_chs"] for i in default]
    assert features.feature_info.reduction() == [info[i]["reduction"] for i in default]
    for index, fmap, ref in zip(default, maps, reference):
        assert tuple(fmap.shape) == _map_shape(info[index], x)
        assert torch.equal(fmap, ref)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("feature_cls", ["list", "getter"])
def test_features_only_explicit_out_indices(name: str, feature_cls: str) -> None:
    """Explicit (also negative) indices through timm's hook-free list wrapper and its
    forward_intermediates-based getter wrapper give the same maps."""
    model = _create(name)
    info = model.feature_info
    picked = [0, len(info) - 2]
    features = _create(name, features_only=True, out_indices=(0, -2), feature_cls=feature_cls)
    assert features.feature_info.channels() == [info[i]["num_chs"] for i in picked]
    assert features.feature_info.reduction() == [info[i]["reduction"] for i in picked]
    x = _input(name)
    with torch.no_grad():
        maps = features(x)
        reference = model.forward_intermediates(x, indices=picked, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [_map_shape(info[i], x) for i in picked]
    for fmap, ref in zip(maps, reference):
        assert torch.equal(fmap, ref)


@pytest.mark.parametrize("name", OURS)
def test_features_only_out_of_range_is_a_clear_error(name: str) -> None:
    n = len(_create(name).feature_info)
    with pytest.raises(ValueError, match=rf"{name}: out_indices=\(0, {n}\) is out of range.*0 = "):
        timm.create_model(name, features_only=True, out_indices=(0, n))


@pytest.mark.parametrize("name", OURS)
def test_forward_intermediates(name: str) -> None:
    model = _create(name)
    info = model.feature_info
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features)
        assert [tuple(t.shape) for t in intermediates] == [_map_shape(i, x) for i in info]
        assert torch.equal(intermediates[-1], features)

        only = model.forward_intermediates(x, intermediates_only=True)
        assert len(only) == len(info) and all(torch.equal(a, b) for a, b in zip(only, intermediates))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:]))

        early, picked = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early, intermediates[1]) and torch.equal(picked[0], intermediates[1])

    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", OURS)
def test_prune_intermediate_layers(name: str) -> None:
    model = _create(name)
    full = copy.deepcopy(model)
    info = model.feature_info
    x = _input(model)
    n_params = sum(p.numel() for p in model.parameters())

    assert model.prune_intermediate_layers([0, -3]) == [0, len(info) - 3]
    kept = info[len(info) - 3]
    assert model.num_features == model.head_hidden_size == kept["num_chs"] and model.num_classes == 0
    assert sum(p.numel() for p in model.parameters()) < n_params
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=[0, -3], intermediates_only=True)
        got = model.forward_intermediates(x, indices=[0, len(info) - 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        assert torch.equal(model(x), ref[-1])  # no head, no pooling: the last kept map
        assert model(x).shape == _map_shape(kept, x)

    # keeping the last feature keeps every layer and drops only the head
    head_only = copy.deepcopy(full)
    head_only.prune_intermediate_layers(1)
    assert head_only.num_features == full.num_features
    assert sum(p.numel() for p in head_only.parameters()) == n_params - sum(p.numel() for p in full.fc.parameters())


@pytest.mark.parametrize("name", OURS)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning")  # torch's GraphModule, as for resnet18
def test_fx_trace_and_torchscript(name: str) -> None:
    model = _create(name)
    x = _input(model)
    traced = torch.fx.symbolic_trace(model)
    scripted = torch.jit.script(model)
    scripted_trace = torch.jit.script(traced)  # scripting reads the traced code's string annotations
    with torch.no_grad():
        expected = model(x)
        for other in (traced, scripted, scripted_trace):
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)

    # timm's FX feature extractor finds the feature_info modules in the traced graph
    fx_features = _create(name, features_only=True, feature_cls="fx")
    with torch.no_grad():
        for a, b in zip(fx_features(x), _create(name, features_only=True)(x)):
            assert torch.equal(a, b)


def _count_forward_calls(module: nn.Module) -> list[int]:
    """A pre-hook: recomputation in backward may stop early inside forward, before a post-hook."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("entry", ["forward", "forward_intermediates"])
def test_grad_checkpointing_recomputes_and_matches(name: str, entry: str) -> None:
    """Same outputs and gradients; a checkpointed block runs again in backward, the stem does not."""
    plain = _create(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = _input(plain)

    def run(model: nn.Module) -> tuple[torch.Tensor, list[int], list[int]]:
        segments = model.feature_segments()
        stem_conv = next(m for m in segments[0][0].modules() if isinstance(m, nn.Conv2d))
        stem_calls, block_calls = _count_forward_calls(stem_conv), _count_forward_calls(segments[-1][-1])
        out = model(x) if entry == "forward" else model.forward_intermediates(x)[1][-1]
        out.square().mean().backward()
        return out, stem_calls, block_calls

    out_plain, stem_plain, block_plain = run(plain)
    out_ckpt, stem_ckpt, block_ckpt = run(ckpt)
    torch.testing.assert_close(out_ckpt, out_plain)
    assert (stem_plain, block_plain) == ([1], [1])
    assert (stem_ckpt, block_ckpt) == ([1], [2])  # recomputed in backward: checkpointing is real
    grads = {n: p.grad for n, p in ckpt.named_parameters()}
    for n, p in plain.named_parameters():
        if p.grad is None:  # the classifier, when only the features were used
            assert grads[n] is None
            continue
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", OURS)
def test_group_matcher_is_one_group_per_local_block(name: str) -> None:
    """Fine groups: the stem, each local block of the project's partition, then the head."""
    model = _create(name)
    blocks = adapter_for(model).local_blocks(model)
    groups = group_parameters(model, model.group_matcher())
    names = dict(model.named_parameters())
    assert sum(len(g) for g in groups.values()) == len(names)
    assert len(groups) == len(blocks) + 1
    for (block_name, block), group in zip(blocks, groups.values()):
        assert {id(names[n]) for n in group} == {id(p) for p in block.parameters()}, block_name
    assert sorted(groups[len(blocks)]) == ["fc.bias", "fc.weight"]
    first_conv = model.pretrained_cfg["first_conv"]
    assert f"{first_conv}.weight" in groups[0]

    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert sum(len(g) for g in coarse.values()) == len(names) and 2 < len(coarse) <= len(groups)
