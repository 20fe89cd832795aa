"""MAN and MAN++ (methods/man.py; on a ViT, methods/man_tokens.py) against their official code (JunhaoSu0/MAN,
networks/resnetInfoPro_MAN.py, resnetInfoPro_MANPP.py and vit_man.py); what MAN and HPFF share (a resume
carries their extra state) for both."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import timm_local
from timm_local.cost import count_macs
from timm_local.engine.ownership import refuse_cross_segment_reads

# Official parameter counts of one MAN head (LB + EMA copies of the next block, Decoder and the '1c2f'
# cross-entropy AuxClassifier of InfoPro's auxiliary_nets.py at the next block's width, 10 classes),
# computed from the official modules:
#   BasicBlock 16->16: 2 * 16*16*9 + 2 * 2*16 = 4,672;  32->32: 2 * 9,216 + 128 = 18,560;
#   64->64: 2 * 36,864 + 256 = 73,984;  16->32 (stride 2, 1x1 downsample): 4,608 + 9,216 + 512 + 3 * 64 = 14,528
#   Decoder(C): C*12*9 + 12 + 24 (BN) + 12*3*9 + 3  ->  16: 2,091;  32: 3,819;  64: 7,275
#   AuxClassifier(C) 1c2f: conv C->C' (3x3) + BN(C') + Linear C'->128 + Linear 128->10
#       16 (C'=32): 4,608 + 64 + 4,224 + 1,290 = 10,186;  32 (C'=64): 18,432 + 128 + 8,320 + 1,290 = 28,170;
#       64 (C'=64): 36,864 + 128 + 8,320 + 1,290 = 46,602
LAYER1, LAYER2, LAYER3 = 2 * 4672 + 2091 + 10186, 2 * 18560 + 3819 + 28170, 2 * 73984 + 7275 + 46602
LAYER2_FIRST = 2 * 14528 + 3819 + 28170  # the next block is layer2.0 (a downsampling block)


@pytest.mark.parametrize("model, k, expected", [
    ("resnet32_cifar", 4, [LAYER1, LAYER2, LAYER3]),          # ends layer1.2, layer2.1, layer3.0
    ("resnet32_cifar", 8, [LAYER1, LAYER1, LAYER2_FIRST, LAYER2, LAYER2, LAYER3, LAYER3]),
    ("resnet110_cifar", 4, [LAYER1, LAYER2, LAYER3]),         # ends layer1.11, layer2.7, layer3.3
])
def test_head_parameters_equal_the_official_heads(model: str, k: int, expected: list[int]) -> None:
    lm = timm_local.create_local_model(model, "man", method_kwargs=dict(local_modules=k))
    assert [sum(p.numel() for p in h.parameters()) for h in lm.heads] == expected
    assert all(not p.requires_grad for h in lm.heads for p in h.ema.parameters())
    assert [sum(p.numel() for p in h.ema.parameters()) for h in lm.heads][:1] == [4672]


def test_head_macs_equal_the_official_head() -> None:
    """Head 0 of ResNet-32 at K = 4 (on layer1.2's 16×32×32 output), one 32×32 image: LB and EMA
    2 × 2 × 16·16·9·1024 = 9,437,184; decoder 16·12·9·1024 + 12·3·9·1024 = 2,101,248;
    classifier 16·32·9·256 + 32·128 + 128·10 = 1,185,024."""
    lm = timm_local.create_local_model("resnet32_cifar", "man", method_kwargs=dict(local_modules=4)).eval()
    head = lm.heads[0]
    h, x = torch.randn(1, 16, 32, 32), torch.randn(1, 3, 32, 32)
    assert count_macs(lambda: head(h), head) == 9_437_184 + 1_185_024
    assert count_macs(lambda: head.local_loss(h, torch.tensor([1]), x), head) == 9_437_184 + 2_101_248 + 1_185_024


def _model(seed: int = 0, method: str = "man", **kwargs) -> timm_local.LocalModel:
    torch.manual_seed(seed)
    kwargs = dict(momentum=0.9, **kwargs) if method == "man" else kwargs
    return timm_local.create_local_model("resnet20_cifar", method, pretrained_cfg_overlay=dict(input_size=(3, 16, 16)),
                                         method_kwargs=dict(local_modules=4 if method == "hpff" else 3, **kwargs))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_ema_copies_follow_the_momentum_formula_after_the_backward() -> None:
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        before = [[p.clone() for p in h.ema.parameters()] for h in model.heads]
        primary = [[p.clone() for p in h.primary[0].parameters()] for h in model.heads]
        opt.zero_grad(set_to_none=True)
        model.local_step(*_batch(step))
        for head, ema0, w0 in zip(model.heads, before, primary):
            for p, e, w in zip(head.ema.parameters(), ema0, w0):
                assert p.grad is None
                assert torch.equal(p, e * 0.9 + w * (1 - 0.9))  # the weights before this step's update
        opt.step()
    assert not torch.equal(model.heads[0].ema.conv1.weight, before[0][0])
    # an evaluation pass (eval mode, no gradient: what training/evaluate.py runs) leaves the copies where they are
    frozen = [p.clone() for p in model.heads.parameters()]
    model.eval()
    with torch.no_grad():
        model.local_step(*_batch(5), backward=lambda loss: None)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.heads.parameters()))


@pytest.mark.parametrize("method", ["man", "hpff"])
def test_resume_from_saved_state_is_bitwise(method: str) -> None:
    """Everything the method trains or follows lives in the state dict: a saved and reloaded run continues
    exactly."""
    def sgd(model):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

    straight = _model(method=method)
    opt = sgd(straight)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        straight.local_step(*_batch(step))
        opt.step()
    first = _model(method=method)
    opt = sgd(first)
    opt.zero_grad(set_to_none=True)
    first.local_step(*_batch(0))
    opt.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(seed=1, method=method)
    resumed.load_state_dict(saved["model"])
    opt = sgd(resumed)
    opt.load_state_dict(saved["opt"])
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        resumed.local_step(*_batch(step))
        opt.step()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_pipeline_refuses_a_cut_between_a_head_and_the_block_it_follows() -> None:
    model = _model()
    refuse_cross_segment_reads(model, [range(0, 3)])
    with pytest.raises(ValueError, match="follows the weights of block 'layer2.0'.*share a segment"):
        refuse_cross_segment_reads(model, [range(0, 1), range(1, 3)])


def test_man_pp_mixes_its_copies_with_a_learnable_scalar_and_adds_a_stem_head() -> None:
    """MAN++ (resnetInfoPro_MANPP.py): each head is MAN's plus one scalar s (init 1); the stem is its own module
    whose head copies layer1[0] (LB_first, EMA_first, Decoder(16), AuxClassifier(16))."""
    lm = timm_local.create_local_model("resnet32_cifar", "man_pp", method_kwargs=dict(local_modules=4))
    assert [s.blocks[-1] for s in lm.stages] == [0, 3, 7, 11, 15]
    assert [sum(p.numel() for p in h.parameters()) for h in lm.heads] == [LAYER1 + 1, LAYER1 + 1, LAYER2 + 1,
                                                                          LAYER3 + 1]
    head = lm.heads[1].eval()
    with torch.no_grad():
        head.s.fill_(0.7)
    h = torch.randn(2, 16, 32, 32)
    assert torch.equal(head.aux_input(h), 0.7 * head.lb(h) + (2 - 0.7) * head.ema(h))
    lm.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    lm.local_step(x, y)
    assert all(h.s.grad is not None and h.s.grad.abs() > 0 for h in lm.heads)
    assert all(p.grad is None for h in lm.heads for p in h.ema.parameters())


@pytest.mark.parametrize("method", ["man", "hpff"])
def test_a_training_run_resumed_from_its_checkpoint_ends_bitwise_as_the_uninterrupted_one(method: str, tmp_path) -> None:
    """tools/train.py end to end: the checkpoint carries the momentum copies / cascade heads, and the run that
    stopped after 2 steps and resumed ends with the uninterrupted run's tensors."""
    from tests.helpers import different_tensors, model_state, train
    from timm_local.training import latest_checkpoint

    flags = ("--model", "resnet20_cifar", "--method", method, "--local-modules", 4 if method == "hpff" else 3)
    assert train(*flags, "--max-steps", 4, "--output-dir", tmp_path / "straight") == 0
    assert train(*flags, "--max-steps", 2, "--output-dir", tmp_path / "stopped") == 0
    assert train(*flags, "--max-steps", 4, "--output-dir", tmp_path / "stopped", "--resume", "auto") == 0
    straight, resumed = (model_state(latest_checkpoint(tmp_path / name)) for name in ("straight", "stopped"))
    assert any(".ema." in k for k in straight) if method == "man" else any("cascade_classifier" in k for k in straight)
    assert not different_tensors(straight, resumed)


def test_an_undone_step_puts_the_momentum_copies_back() -> None:
    """training/finite.py undoes a non-finite step; MAN's copies move without the optimizer, so they are undone
    with the BatchNorm statistics."""
    from timm_local.training.finite import FiniteGuard

    model = _model()
    guard = FiniteGuard(model)
    before = [p.clone() for p in model.heads[0].ema.parameters()]
    guard.before_step()
    model.local_step(*_batch(0))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.heads[0].ema.parameters()))
    guard.undo_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.heads[0].ema.parameters()))


# ------------------------------------------------------------------------------------- MAN++'s ViT variant
#: A ViT block's parameters (timm's and vit_man.py's Block, qkv with bias, MLP ratio 4): two LayerNorms (4d),
#: qkv (3d² + 3d), proj (d² + d), fc1 (4d² + 4d), fc2 (4d² + d).
def vit_block_params(d: int) -> int:
    return 12 * d * d + 13 * d


def test_man_pp_on_a_vit_has_the_official_vit_heads_and_equal_groups() -> None:
    """vit_man.py, ViT-Tiny (d = 192, depth 12, 1000 classes) at K = 4: groups of 3 blocks, the patch embedding in
    the first and no stem head; per head, trained copies of the next group's first 2 blocks, a LayerNorm, a
    linear classifier and s, plus a frozen copy of that group's first block."""
    lm = timm_local.create_local_model("vit_tiny_patch16_224", "man_pp", method_kwargs=dict(local_modules=4))
    assert [s.blocks for s in lm.stages] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    d = 192
    trained = 2 * vit_block_params(d) + 2 * d + d * 1000 + 1000 + 1
    for head in lm.heads:
        assert sum(p.numel() for p in head.parameters() if p.requires_grad) == trained == 1_083_113
        assert sum(p.numel() for p in head.ema.parameters()) == vit_block_params(d) == 444_864
        assert head.momentum == 0.995 and head.pool == "token"
    assert [h.reads_blocks for h in lm.heads] == [(4,), (7,), (10,)]


def _small_vit_man_pp(local_modules: int = 4, **kwargs):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=8, embed_dim=64, num_heads=2,
                            num_classes=10)
    return timm_local.create_local_model(vit, "man_pp", input_size=(3, 32, 32),
                                         method_kwargs=dict(local_modules=local_modules, **kwargs))


def test_man_pp_vit_moves_its_copy_before_the_backward_as_the_official_forward_does() -> None:
    """The official forward moves EMA through ``.data`` between the loss and its backward, so the backward through
    the copy uses the moved weights: the head's loss, feature gradient, s gradient and moved copy equal that
    order's, and differ from the order MAN's CNN code uses (move after the backward)."""
    import copy

    lm = _small_vit_man_pp(momentum=0.5)
    head = lm.heads[0].train()
    primary = head.primary[0]
    with torch.no_grad():
        for p in primary.parameters():
            p.add_(torch.randn_like(p))  # a primary far from its copy, so the move is visible
    h = torch.randn(3, 17, 64)
    target = torch.tensor([1, 4, 7])

    def official(move_first: bool) -> tuple[torch.Tensor, ...]:
        ref = copy.deepcopy(head)
        feats = h.clone().requires_grad_()
        y = ref.s * ref.lb[0](feats) + (2 - ref.s) * ref.ema(feats)
        loss = F.cross_entropy(ref.classifier(ref.norm(ref.lb[1](y))[:, 0]), target)

        def move() -> None:
            for e, w in zip(ref.ema.parameters(), primary.parameters()):
                e.data.mul_(0.5).add_(w.data, alpha=0.5)

        if move_first:
            move()
        loss.backward()
        if not move_first:
            move()
        return loss.detach(), feats.grad, ref.s.grad, torch.cat([p.flatten() for p in ref.ema.parameters()])

    expected, other_order = official(move_first=True), official(move_first=False)
    feats = h.clone().requires_grad_()
    loss, _ = head.local_loss(feats, target, torch.zeros(3, 3, 32, 32))
    loss.backward()
    ours = (loss.detach(), feats.grad, head.s.grad, torch.cat([p.flatten() for p in head.ema.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    assert not torch.equal(ours[1], other_order[1])  # the order is observable in the gradient


def test_man_pp_vit_step_trains_s_and_never_the_momentum_copies() -> None:
    lm = _small_vit_man_pp()
    assert [s.blocks for s in lm.stages] == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    assert [len(h.lb) for h in lm.heads] == [2, 2, 2]
    before = [p.clone() for h in lm.heads for p in h.ema.parameters()]
    primaries = [p.clone() for h in lm.heads for p in h.primary[0].parameters()]
    out = lm.train().local_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert len(out.losses) == 4 and all(torch.isfinite(v) for v in out.losses)
    assert all(h.s.grad is not None and h.s.grad.abs() > 0 for h in lm.heads)
    assert all(p.grad is None for h in lm.heads for p in h.ema.parameters())
    moved = [p for h in lm.heads for p in h.ema.parameters()]
    assert all(torch.equal(m, e.mul(0.995).add(w, alpha=1 - 0.995)) for m, e, w in zip(moved, before, primaries))
    lm.eval().local_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(a, b) for a, b in zip(moved, [p for h in lm.heads for p in h.ema.parameters()]))


def test_man_pp_vit_split_falls_back_to_balance_when_k_does_not_divide_the_depth() -> None:
    lm = _small_vit_man_pp(local_modules=3)  # 8 blocks in 3 equal groups is impossible
    assert len(lm.stages) == 3 and lm.stages[-1].blocks[-1] == 8
    assert lm.method.config()["momentum"] is None  # the variant's default, resolved at build
