"""The generic family on real timm models: ConvNeXt, MobileNetV3, ResNetV2, DenseNet, ViT, Swin.

Tiny configurations (timm's own ``test_*`` models, or narrow/shallow constructor arguments) at
32-64 px, so every test is fast; the architectures are timm's real block classes.
"""
from __future__ import annotations

import functools
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_local
from timm_local.cost import count_macs
from timm_local.families.copies import ShapeProjection
from timm_local.families.fx_trace import TraceFailure, output_structures
from timm_local.partition import partition
from tests.helpers import ROOT, load_module


NUM_CLASSES = 10
# name -> (timm kwargs, probe size, expected layout of the block outputs)
MODELS = {
    "convnext_atto": ({}, 64, "NCHW"),
    "mobilenetv3_small_050": ({}, 64, "NCHW"),
    "resnetv2_18": ({}, 64, "NCHW"),
    "densenet121": ({"growth_rate": 8, "block_config": (2, 2, 2, 2)}, 64, "NCHW"),
    "test_vit": ({}, 32, "NLC"),
    "swin_tiny_patch4_window7_224": (
        {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)},
        64, "NHWC"),
}


@functools.lru_cache(maxsize=None)
def _prototype(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=NUM_CLASSES, **MODELS[name][0])


def fresh(name: str) -> nn.Module:
    import copy

    return copy.deepcopy(_prototype(name))


def probe(name: str) -> tuple[int, int, int]:
    return (3, MODELS[name][1], MODELS[name][1])


def expected_blocks(model: nn.Module) -> int:
    """Local blocks the cut must find: the stem + every residual / transformer block of the model.

    (DenseNet's dense layers concatenate all earlier outputs, so a whole dense block -- with the
    transition timm groups with it -- is one local block.)"""
    name = type(model).__name__
    if name == "VisionTransformer":
        return 1 + len(model.blocks)
    if name in ("ConvNeXt", "ResNetV2"):
        return 1 + sum(len(s.blocks) for s in model.stages)
    if name == "SwinTransformer":
        return 1 + sum(len(s.blocks) for s in model.layers)
    if name == "MobileNetV3":  # the last stage's lone 1x1 ConvBnAct joins the block before it
        return 1 + sum(len(s) for s in model.blocks) - 1
    if name == "DenseNet":
        return 1 + sum(n.startswith("denseblock") for n, _ in model.features.named_children())
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_cut_reproduces_forward_features(name: str) -> None:
    model = fresh(name).eval()
    p = partition(model, input_size=probe(name))
    assert p.adapter.name == "generic" and p.names[0] == "stem"
    assert len(p) == expected_blocks(model), p.names
    assert {s.layout for s in p.specs[1:]} == {MODELS[name][2]}
    x = torch.randn(2, *probe(name))
    with torch.no_grad():
        assert torch.equal(p.forward_features(x), model.forward_features(x))
    # every parameter forward_features uses is in exactly one block; the rest is the top
    owned = [id(q) for b in p.blocks for q in b.parameters()]
    assert len(owned) == len(set(owned))
    top = {id(q) for q in model.parameters()} - set(owned)
    with torch.no_grad():
        features = model.forward_features(x)
    model.zero_grad(set_to_none=True)
    model.forward_head(features.requires_grad_()).sum().backward()
    assert top == {id(q) for q in model.parameters() if q.grad is not None}


def test_specific_families_keep_priority_and_hand_over_what_they_cannot_copy() -> None:
    assert partition(timm.create_model("resnet18"), input_size=(3, 64, 64)).adapter.name == "resnet"
    for name in ("res2net50_14w_8s", "resnest14d", "skresnet18"):
        p = partition(timm.create_model(name, num_classes=NUM_CLASSES), input_size=(3, 64, 64))
        assert p.adapter.name == "generic" and len(p) == 1 + sum(len(getattr(p.model, f"layer{i}")) for i in range(1, 5))


def _grad_sources(lm: timm_local.LocalModel, x: torch.Tensor, y: torch.Tensor) -> None:
    """For each stage alone: its blocks and head get gradient, nothing else does."""
    for only in range(len(lm.stages)):
        lm.zero_grad(set_to_none=True)
        calls = iter(range(len(lm.stages)))
        lm.local_step(x, y, backward=lambda loss: loss.backward() if next(calls) == only else None)
        stage = lm.stages[only]
        for b, block in enumerate(lm.partition.blocks):
            grads = [q.grad for q in block.parameters()]
            if b in stage.blocks:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), lm.partition.names[b]
            else:
                assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), (only, lm.partition.names[b])
        for head in lm.heads:
            got = [q.grad is not None for q in head.parameters()]
            assert all(got) if head is stage.head else not any(got)


@pytest.mark.parametrize("name", ["convnext_atto", "test_vit"])
def test_detach_contract_on_generic_blocks(name: str) -> None:
    lm = timm_local.create_local_model(fresh(name), "auglocal", aux_depth=3, input_size=probe(name))
    x, y = torch.randn(4, *probe(name)), torch.tensor([0, 1, 2, 3])
    _grad_sources(lm, x, y)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_auglocal_head_on_a_vit_pools_as_the_model_head(global_pool: str) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=NUM_CLASSES, global_pool=global_pool)
    lm = timm_local.create_local_model(vit, "auglocal", aux_depth=3, input_size=(3, 32, 32))
    head = lm.heads[0]
    h = torch.randn(3, *lm.partition.specs[-1].shape)
    pooled = head.pool(h)
    if global_pool == "token":  # the class token; the final norm is in the copied last block
        assert torch.equal(pooled, h[:, 0])
    else:  # mean of the patch tokens, then the model's own fc_norm (a fresh LayerNorm)
        expected = F.layer_norm(h[:, vit.num_prefix_tokens:].mean(1), (h.shape[-1],), eps=vit.fc_norm.eps)
        assert torch.allclose(pooled, expected, atol=1e-6)
        norms = [m for m in head.pool.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 1 and norms[0] is not vit.fc_norm
    assert isinstance(head.norm, nn.Identity)  # no BatchNorm1d: the model's own norm is used
    assert head.fc.in_features == vit.num_features and head.fc.out_features == NUM_CLASSES
    # the pooling holds no parameter of the network's top (it is a copy, not the model's fc_norm)
    assert not {id(q) for q in head.parameters()} & {id(q) for q in vit.parameters()}
    # and the last copied layer is a fresh copy of the last block, final norm included
    assert type(head.layers[-1]) is type(lm.partition.blocks[-1])


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_copy_reinitialises(name: str) -> None:
    """A copy has the primary block's architecture and output shape, and no weight of it."""
    model = fresh(name)
    p = partition(model, input_size=probe(name))
    with torch.no_grad():  # a "trained" primary: no parameter at its init value any more
        for q in model.parameters():
            q.add_(torch.rand_like(q) + 0.5)
    x = torch.randn(2, *probe(name))
    with torch.no_grad():
        inputs = [x]
        for block in p.blocks[:-1]:
            inputs.append(block.eval()(inputs[-1]))
    for j in range(1, len(p)):
        copy_j = p.make_shaped_copy(j, p.specs[j - 1])
        primary = dict(p.blocks[j].named_parameters())
        copied = dict(copy_j.named_parameters())
        assert set(copied) == set(primary), p.names[j]
        for key, q in copied.items():
            assert q is not primary[key] and q.shape == primary[key].shape
            assert not torch.equal(q, primary[key]), (p.names[j], key)
        with torch.no_grad():
            assert copy_j.eval()(inputs[j]).shape == p.blocks[j](inputs[j]).shape


@pytest.mark.parametrize("name, layout", [("convnext_atto", "NCHW"), ("swin_tiny_patch4_window7_224", "NHWC")])
def test_projection_adapts_shape_and_counts_in_macs(name: str, layout: str) -> None:
    """A copy of a later-stage block fed with early features: a projection supplies the block's
    input width and resolution (the stride the deficit asks for) and its MACs are counted."""
    p = partition(fresh(name), input_size=probe(name))
    j = len(p) - 1
    source = p.specs[1]
    layer = p.make_shaped_copy(j, source).eval()
    assert isinstance(layer, nn.Sequential) and isinstance(layer[0], ShapeProjection)
    h = torch.randn(2, *source.shape)
    target = p.specs[j - 1]
    with torch.no_grad():
        projected = layer[0](h)
        assert projected.shape[1:] == target.shape
        assert layer(h).shape[1:] == p.specs[j].shape
    assert layer[0].stride == target.reduction // source.reduction > 1
    positions = target.shape[1] * target.shape[2] if layout == "NCHW" else target.shape[0] * target.shape[1]
    macs_per_image = count_macs(lambda: layer[0](h)) / h.shape[0]
    assert macs_per_image == source.out_chs * target.out_chs * positions  # the 1x1 conv / the linear


def test_auglocal_plans_use_the_shape_rule_for_generic_copies() -> None:
    from timm_local.methods.auglocal import partition_plans

    p = partition(fresh("convnext_atto"), input_size=(3, 64, 64))
    for plan in partition_plans(p, 3, 0.5):
        reductions = [p.specs[plan.block].reduction] + [p.specs[j].reduction for j in plan.selection]
        assert plan.strides == tuple(b // a for a, b in zip(reductions, reductions[1:]))


@pytest.mark.parametrize("method", ["dgl", "predsim", "infopro", "auglocal_infopro"])
def test_feature_map_methods_refuse_tokens_and_name_the_ones_that_work(method: str) -> None:
    with pytest.raises(ValueError) as info:
        timm_local.create_local_model(fresh("test_vit"), method, input_size=(3, 32, 32))
    message = str(info.value)
    assert method in message and "tokens" in message
    assert all(m in message for m in ("auglocal", "bp", "checkpoint"))


@pytest.mark.parametrize("method", ["bp", "checkpoint", "auglocal"])
@pytest.mark.parametrize("name", ["test_vit", "swin_tiny_patch4_window7_224"])
def test_token_and_channels_last_models_train(name: str, method: str) -> None:
    lm = timm_local.create_local_model(fresh(name), method, input_size=probe(name))
    x, y = torch.randn(4, *probe(name)), torch.tensor([0, 1, 2, 3])
    out = lm.local_step(x, y)
    assert out.logits.shape == (4, NUM_CLASSES) and all(torch.isfinite(loss) for loss in out.losses)
    assert not [n for n, q in lm.backbone.named_parameters() if q.grad is None and "head" not in n]


def test_dgl_runs_on_channels_last_maps() -> None:
    lm = timm_local.create_local_model(fresh("swin_tiny_patch4_window7_224"), "dgl", input_size=(3, 64, 64))
    out = lm.local_step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert len(out.losses) == len(lm.partition) and all(torch.isfinite(loss) for loss in out.losses)


@pytest.mark.parametrize("args", [
    ["--model", "convnext_atto", "--input-size", "3", "64", "64"],
    ["--model", "vit_tiny_patch16_224"],  # at its own input size (224)
])
def test_cost_tool_on_generic_models(args: list[str], capsys, monkeypatch) -> None:
    tool = load_module("_cost_tool", ROOT / "tools" / "cost.py")
    monkeypatch.setattr("sys.argv", ["cost.py", *args, "--method", "auglocal", "--aux-depth", "3", "--json"])
    tool.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == args[1] and report["aux_depth"] == 3
    assert report["input_size"] == ([3, 64, 64] if len(args) > 2 else [3, 224, 224])
    assert report["gmacs"] > 1.5 * report["gmacs_backbone"] > 0 and report["aux_params"] > report["params"] / 2


def test_pipeline_cut_counts_macs_where_parameters_are_viewed_under_no_grad() -> None:
    """CaiT expands its class token under no_grad; the cut's MAC count (the pipeline's --pipeline-cost macs)
    counts it as the cost report does, stage by stage."""
    from timm_local.cost import macs_per_sample
    from timm_local.engine.cut import local_stage_costs

    model = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              depth_token_only=1, num_classes=NUM_CLASSES)
    lm = timm_local.create_local_model(model, "auglocal", aux_depth=2, input_size=(3, 32, 32))
    costs = local_stage_costs(lm, (3, 32, 32), "macs")
    assert len(costs) == len(lm.stages) and min(costs) > 0
    assert sum(costs) == pytest.approx(macs_per_sample(lm, (3, 32, 32))["gmacs_train"] * 1e9, rel=1e-6)
    assert all(p.requires_grad for p in lm.parameters())  # counting froze them only while it ran


def test_token_projections_keep_class_tokens_and_resample_the_grid() -> None:
    """Token sequences are read as leading class tokens + a square patch grid (PiT, ConViT, hybrids)."""
    from timm_local.partition import BlockSpec

    def spec(layout: str, shape: tuple[int, ...]) -> BlockSpec:
        return BlockSpec(0, "b", shape[0] if layout == "NCHW" else shape[-1], 1, layout, shape)

    x = torch.randn(2, 197, 64)  # class token + 14 x 14 patches
    down = ShapeProjection(spec("NLC", (197, 64)), spec("NLC", (50, 128)))  # -> class token + 7 x 7
    assert down.stride == 2 and down(x).shape == (2, 50, 128)
    assert torch.allclose(down(x)[:, 0], down.linear(x[:, 0]))  # the class token, mapped channel-wise
    grid = x[:, 1:].reshape(2, 14, 14, 64)[:, ::2, ::2]
    assert torch.allclose(down(x)[:, 1:], down.linear(grid).flatten(1, 2))
    joins = ShapeProjection(spec("NLC", (196, 64)), spec("NLC", (197, 64)))  # a class token joins (ConViT)
    y = joins(x[:, 1:])
    assert y.shape == (2, 197, 64) and torch.equal(y[:, 0], joins.tokens[0, 0].expand(2, -1))
    hybrid = ShapeProjection(spec("NCHW", (32, 28, 28)), spec("NLC", (197, 64)))  # a CNN stem -> tokens
    assert hybrid(torch.randn(2, 32, 28, 28)).shape == (2, 197, 64)
    with pytest.raises(ValueError, match="cannot project"):
        ShapeProjection(spec("NLC", (1000, 64)), spec("NLC", (197, 64)))  # no grid (961 < 1000 - 16), far apart


@pytest.mark.parametrize("name, blocks", [
    ("vit_tiny_patch16_dinov3_qkvb", lambda m: 1 + len(m.blocks)),  # EVA: a rotary table for the token grid
    ("xcit_nano_12_p8_224", lambda m: 1 + len(m.blocks) + len(m.cls_attn_blocks)),  # grid size (Hp, Wp)
])
def test_values_of_the_input_shape_cross_block_boundaries(name: str, blocks) -> None:
    """Glue values that depend only on the input's shape are fixed at the probe size (checked on
    the block's input), and the batch size is read off each block's input."""
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    p = partition(model, input_size=(3, 64, 64))
    assert len(p) == blocks(model), p.names
    x = torch.randn(3, 3, 64, 64)  # a batch size the probes did not use
    with torch.no_grad():
        assert torch.allclose(p.forward_features(x), model.forward_features(x), atol=1e-5)
        wrong = torch.randn(3, p.specs[1].shape[0] + 3, p.specs[1].shape[1])
        with pytest.raises(ValueError, match="input_size="):
            p.blocks[2](wrong)


class _AssertsOnItsInput(nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 99:
            raise AssertionError  # as a bare assert does outside pytest: an exception without a message
        return x


def test_a_model_failing_without_a_message_is_named_not_hidden() -> None:
    """The one-line error keeps the exception's type when it has no message (it raised IndexError before)."""
    with pytest.raises(TraceFailure, match=r"_AssertsOnItsInput.forward_features does not run on inputs of shape "
                                           r"\(3, 8, 8\) \(AssertionError: \)"):
        output_structures(_AssertsOnItsInput(), "forward_features", torch.zeros(1, 3, 8, 8))
