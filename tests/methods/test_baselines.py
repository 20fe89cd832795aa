"""The baselines of docs/spec.md §3: DGL, PredSim, InfoPro, AugLocal + InfoPro, BP + checkpointing.

Fast by default: ResNet-110 appears only where the paper's numbers are about ResNet-110 (the
MAC row), everything else runs on resnet20/32_cifar with tiny batches.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_local
from timm_local.cost import macs_per_sample, peak_step_memory
from timm_local.methods._shared import INFOPRO_PRESETS, InfoProDecoder
from timm_local.methods.dgl import DGLHead
from timm_local.methods.infopro import ReconstructionHead
from timm_local.methods.predsim import PredSimHead, predsim_pool_size, similarity_loss, similarity_matrix
from timm_local.models._cfg import CIFAR_MEAN, CIFAR_STD

LOCAL_METHODS = [
    ("dgl", {}),
    ("predsim", {}),
    ("infopro", {}),
    ("auglocal_infopro", {"aux_depth": 2}),
    ("auglocal", {"aux_depth": 3}),
]


def _tiny(method: str, model: str = "resnet20_cifar", size: int = 16, **kwargs) -> timm_local.LocalModel:
    """A CIFAR ResNet at ``size``×``size`` (pretrained_cfg says so too, for build-time sizes)."""
    return timm_local.create_local_model(
        model, method, pretrained_cfg_overlay=dict(input_size=(3, size, size)), **kwargs
    )


# ----------------------------------------------------------------------------- MACs (Table 2)
@pytest.fixture(scope="module")
def resnet110_macs() -> dict[str, tuple[timm_local.LocalModel, dict[str, float]]]:
    out = {}
    for method in ("dgl", "predsim", "infopro"):
        model = timm_local.create_local_model("resnet110_cifar", method)
        out[method] = (model, macs_per_sample(model, (3, 32, 32), batch_size=1))
    return out


@pytest.mark.parametrize("method, paper", [("bp", 0.25), ("dgl", 0.26), ("predsim", 0.25), ("infopro", 0.34)])
def test_resnet110_gmacs_match_paper(resnet110_macs, method: str, paper: float) -> None:
    if method == "bp":  # the backbone alone: measured inside every other method's count
        model, macs = resnet110_macs["dgl"]
        macs = {"gmacs": macs["gmacs_backbone"]}
    else:
        model, macs = resnet110_macs[method]
        # per-block baselines: a head on every block but the last (N-1 = 54 heads)
        assert len(model.heads) == len(model.partition) - 1 == 54
    assert abs(macs["gmacs"] / paper - 1) <= 0.025, (method, macs["gmacs"], paper)


def test_resnet110_gmacs_train_adds_exactly_the_training_only_networks(resnet110_macs) -> None:
    """gmacs_train - gmacs = PredSim's similarity convs / InfoPro's decoders, counted by hand."""
    specs = resnet110_macs["dgl"][0].partition.specs[:-1]
    sizes = [32 // s.reduction for s in specs]
    # similarity conv, plus the two B×F @ F×B similarity matmuls (features, one-hot labels) at B=1
    sim_convs = sum(s.out_chs * s.out_chs * 9 * hw * hw + s.out_chs + 10 for s, hw in zip(specs, sizes))
    decoders = sum((s.out_chs * 12 + 12 * 3) * 9 * 32 * 32 for s in specs)
    for method, extra in (("predsim", sim_convs), ("infopro", decoders), ("dgl", 0)):
        macs = resnet110_macs[method][1]
        assert (macs["gmacs_train"] - macs["gmacs"]) * 1e9 == pytest.approx(extra, rel=1e-6), method


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method, kwargs", LOCAL_METHODS + [("checkpoint", {})])
def test_local_losses_finite_and_decreasing(method: str, kwargs: dict) -> None:
    model = _tiny(method, **kwargs)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        history.append(torch.stack(model.local_step(x, y).losses))
        opt.step()
    losses = torch.stack(history)  # steps × stages
    assert torch.isfinite(losses).all()
    assert losses.shape[1] == len(model.stages)
    decreased = losses[-1] < losses[0]
    assert decreased.all(), f"{method}: stages whose loss did not decrease: {(~decreased).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("method, kwargs", LOCAL_METHODS)
def test_detach_contract(method: str, kwargs: dict) -> None:
    """Each local loss's backward changes the gradients of its own stage's parameters only."""
    model = _tiny(method, **kwargs)
    owner: dict[int, int] = {}
    for s, stage in enumerate(model.stages):
        for b in stage.blocks:
            owner.update({id(p): s for p in model.partition.blocks[b].parameters()})
        if stage.head is not None:
            owner.update({id(p): s for p in stage.head.parameters()})
    last = len(model.stages) - 1
    params = list(model.parameters())
    for p in params:
        owner.setdefault(id(p), last)  # the network's own top belongs to the final stage
    calls: list[int] = []

    def checked_backward(loss: torch.Tensor) -> None:
        s = len(calls)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        loss.backward()
        for p, g in zip(params, before):
            if owner[id(p)] == s:
                continue
            unchanged = p.grad is None if g is None else torch.equal(p.grad, g)
            assert unchanged, f"{method}: the loss of stage {s} reached a parameter of stage {owner[id(p)]}"
        own_blocks = [p for b in model.stages[s].blocks for p in model.partition.blocks[b].parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own_blocks), s
        calls.append(s)

    model.local_step(torch.randn(4, 3, 16, 16), torch.arange(4), backward=checked_backward)
    assert calls == list(range(len(model.stages)))


def test_checkpoint_has_bp_gradients_with_lower_peak_memory() -> None:
    bp = timm_local.create_local_model("resnet20_cifar", "bp")
    ckpt = timm_local.create_local_model("resnet20_cifar", "checkpoint")
    ckpt.backbone.load_state_dict(bp.backbone.state_dict())
    assert len(ckpt.stages) == 1 and ckpt.stages[0].checkpoint and len(ckpt.heads) == 0
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    out_bp, out_ckpt = bp.local_step(x, y), ckpt.local_step(x, y)
    assert torch.allclose(out_bp.losses[0], out_ckpt.losses[0])
    for (name, p), q in zip(bp.backbone.named_parameters(), ckpt.backbone.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    mem_bp = peak_step_memory(bp, x, y)["peak_memory_bytes"]
    mem_ckpt = peak_step_memory(ckpt, x, y)["peak_memory_bytes"]
    assert mem_ckpt < 0.8 * mem_bp, (mem_ckpt, mem_bp)


# ----------------------------------------------------------------------------- PredSim
def test_predsim_similarity_loss_is_zero_when_features_reproduce_label_similarity() -> None:
    y = torch.tensor([0, 3, 3, 7, 1, 0, 9, 7])
    # per-channel spatial std = one-hot label exactly: the pattern (1, 1, -1, -1, 0) has mean 0
    # and unbiased std sqrt(4 / 4) = 1, both exact in floating point
    pattern = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0]).view(1, 1, 1, 5)
    features = F.one_hot(y, 10).float()[:, :, None, None] * pattern
    assert torch.equal(features.flatten(2).std(dim=2), F.one_hot(y, 10).float())
    assert similarity_loss(features, y, 10).item() == 0.0
    # scale invariant (a power of two keeps it exact), and not trivially zero
    assert similarity_loss(4 * features, y, 10).item() == 0.0
    assert similarity_loss(features, y.roll(1), 10).item() > 0.05
    # wider feature maps (more channels than classes) with the same per-sample statistics
    wide = torch.cat([features, torch.zeros(8, 6, 1, 5)], dim=1)
    assert similarity_matrix(wide).shape == (8, 8)


def test_predsim_heads_follow_block_shape() -> None:
    model = timm_local.create_local_model("resnet32_cifar", "predsim")
    for stage in model.stages[:-1]:
        spec = model.partition.specs[stage.blocks[0]]
        head = stage.head
        assert isinstance(head, PredSimHead)
        assert head.fc.in_features <= 512 and head.fc.in_features == spec.out_chs * math.prod(head.pool_size)
        assert head.sim_conv.in_channels == head.sim_conv.out_channels == spec.out_chs
    assert predsim_pool_size(16, 32, 32) == (4, 8)  # Nøkland's alternating kernel doubling
    assert predsim_pool_size(64, 8, 8) == (2, 4)
    assert predsim_pool_size(2048, 7, 7) == (1, 1)  # cannot pool below one position


# ----------------------------------------------------------------------------- InfoPro
def test_infopro_reconstruction_target_is_denormalised_input() -> None:
    model = _tiny("infopro")
    decoder = model.heads[0].decoder
    assert isinstance(decoder, InfoProDecoder)
    assert model.backbone.pretrained_cfg["mean"] == CIFAR_MEAN  # the default comes from here
    image = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    normalised = (image - mean) / std
    target = decoder.target(normalised)
    assert torch.allclose(target, image, atol=1e-6)
    assert target.min() >= 0 and target.max() <= 1
    # and it is what the loss regresses onto
    features = torch.randn(2, model.partition.specs[0].out_chs, 16, 16)
    expected = F.binary_cross_entropy(torch.sigmoid(decoder(features, normalised)), image)
    assert torch.allclose(decoder.loss(features, normalised), expected, atol=1e-5)
    # overridable through method kwargs
    other = _tiny("infopro", method_kwargs=dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert torch.allclose(other.heads[0].decoder.target(normalised), (normalised * 0.25 + 0.5).clamp(0, 1))


def test_infopro_heads_follow_partition_and_weight_schedule() -> None:
    model = timm_local.create_local_model("resnet32_cifar", "infopro")
    assert len(model.heads) == 15 and len(model.partition) == 16  # K = 16, heads on 0..K-2
    convs = [(h.classifier[0].in_channels, h.classifier[0].out_channels, h.classifier[0].stride[0]) for h in model.heads]
    assert convs == [(16, 32, 2)] * 6 + [(32, 64, 2)] * 5 + [(64, 64, 1)] * 4
    assert model.method.resolved[0] == "resnet32"  # "auto" on 16 blocks
    lx = [h.lambda_x for h in model.heads]
    ly = [h.lambda_y for h in model.heads]
    assert lx[0] == pytest.approx(5.0) and lx[-1] == pytest.approx(0.2) and lx[7] == pytest.approx(2.6)
    assert ly[0] == pytest.approx(0.05) and ly[-1] == pytest.approx(0.5) and ly[7] == pytest.approx(0.275)
    assert all(a > b for a, b in zip(lx, lx[1:])) and all(a < b for a, b in zip(ly, ly[1:]))
    # the ResNet-110 schedule can be selected for any depth, and endpoints overridden
    deep = timm_local.create_local_model("resnet20_cifar", "infopro", method_kwargs=dict(weights="resnet110"))
    assert (deep.heads[0].lambda_x, deep.heads[0].lambda_y) == (5.0, 0.0)
    assert (deep.heads[-1].lambda_x, deep.heads[-1].lambda_y) == (0.5, 1.0)
    custom = timm_local.create_local_model("resnet20_cifar", "infopro", method_kwargs=dict(lambda_y=(1, 1)))
    assert {h.lambda_y for h in custom.heads} == {1.0} and custom.heads[0].lambda_x == 5.0


def test_infopro_auto_preset_picks_nearest_depth() -> None:
    from timm_local.methods._shared import resolve_loss_weights

    assert resolve_loss_weights("auto", 55)[0] == "resnet110"
    assert resolve_loss_weights("auto", 10)[0] == "resnet32"
    assert resolve_loss_weights("auto", 36)[0] == "resnet110" and resolve_loss_weights("auto", 35)[0] == "resnet32"
    assert set(INFOPRO_PRESETS) == {"resnet32", "resnet110"}


def test_auglocal_infopro_combines_auglocal_heads_with_reconstruction() -> None:
    model = _tiny("auglocal_infopro", aux_depth=3)
    reference = _tiny("auglocal", aux_depth=3)
    assert len(model.heads) == len(reference.heads)  # same K as AugLocal: N - D - 1 heads
    for head, ref in zip(model.heads, reference.heads):
        assert isinstance(head, ReconstructionHead)
        assert [type(m) for m in head.classifier.modules()] == [type(m) for m in ref.modules()]
    assert model.stages[-1].blocks == reference.stages[-1].blocks
    assert model.heads[0].lambda_x == 5.0 and model.heads[-1].lambda_x == pytest.approx(0.2)


# ----------------------------------------------------------------------------- other families
@pytest.mark.parametrize("method", ["dgl", "predsim", "infopro"])
def test_baselines_derive_heads_from_block_shapes_on_imagenet_resnet(method: str) -> None:
    """timm's resnet18 at 64×64: widths 64..512, maps 16×16..2×2; no CIFAR widths anywhere."""
    model = timm_local.create_local_model(
        timm.create_model("resnet18", num_classes=7, pretrained_cfg_overlay=dict(input_size=(3, 64, 64))),
        method,
        input_size=(3, 64, 64),
    )
    specs = model.partition.specs
    for stage in model.stages[:-1]:
        spec, head = specs[stage.blocks[0]], stage.head
        if method == "dgl":
            assert isinstance(head, DGLHead) and head.convs[0].in_channels == spec.out_chs
            assert head.mlp_in_size == min(2, math.ceil(64 // spec.reduction / 4))
        elif method == "infopro":
            assert head.classifier[0].in_channels == head.decoder.decoder[0].in_channels == spec.out_chs
    out = model.local_step(torch.randn(2, 3, 64, 64), torch.tensor([1, 6]))
    assert torch.isfinite(torch.stack(out.losses)).all() and out.logits.shape == (2, 7)


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("infopro", dict(weights="resnet50"), "weights must be 'auto' or one of"),
        ("infopro", dict(lambda_x=(1.0,)), "lambda_x must be"),
        ("predsim", dict(sim_weight=1.5), "sim_weight"),
        ("auglocal_infopro", dict(aux_depth=1), "aux_depth"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(method: str, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        timm_local.create_method(method, **kwargs)


def test_infopro_without_dataset_stats_is_a_clear_error() -> None:
    backbone = timm.create_model("resnet20_cifar")
    backbone.pretrained_cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k not in ("mean", "std")}
    with pytest.raises(ValueError, match="method_kwargs=dict\\(mean="):
        timm_local.create_local_model(backbone, "infopro")


def test_new_methods_are_registered() -> None:
    assert {"dgl", "predsim", "infopro", "auglocal_infopro", "checkpoint"} <= set(timm_local.list_methods())


def test_checkpoint_updates_batchnorm_running_stats_like_bp() -> None:
    bp = timm_local.create_local_model("resnet20_cifar", "bp")
    ckpt = timm_local.create_local_model("resnet20_cifar", "checkpoint")
    ckpt.backbone.load_state_dict(bp.backbone.state_dict())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    bp.local_step(x, y)
    ckpt.local_step(x, y)
    for (name, a), b in zip(bp.backbone.named_buffers(), ckpt.backbone.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
