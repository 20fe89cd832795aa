"""Cutting timm models into local blocks."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_local
from timm_local import partition


@pytest.mark.parametrize(
    "name, input_size, num_blocks, out_chs, reductions",
    [
        # stem + 3 x 18 BasicBlocks
        ("resnet110_cifar", (3, 32, 32), 55, [16] * 19 + [32] * 18 + [64] * 18, [1] * 19 + [2] * 18 + [4] * 18),
        ("resnet32_cifar", (3, 32, 32), 16, [16] * 6 + [32] * 5 + [64] * 5, [1] * 6 + [2] * 5 + [4] * 5),
        # stem (conv1, bn1, act1, maxpool) + 3/4/6/3 BasicBlocks
        ("resnet34", (3, 64, 64), 17, [64] * 4 + [128] * 4 + [256] * 6 + [512] * 3, [4] * 4 + [8] * 4 + [16] * 6 + [32] * 3),
        ("resnet50", (3, 64, 64), 17, [64] + [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3, [4] * 4 + [8] * 4 + [16] * 6 + [32] * 3),
        # 16 conv layers; a block that ends with a max-pool halves the size
        ("vgg19_cifar", (3, 32, 32), 16,
         [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8, [1, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32]),
    ],
)
def test_partition_blocks_and_specs(name, input_size, num_blocks, out_chs, reductions) -> None:
    model = timm.create_model(name, num_classes=10)
    part = partition(model, input_size=input_size)
    assert len(part) == num_blocks
    assert [s.out_chs for s in part.specs] == out_chs
    assert [s.reduction for s in part.specs] == reductions
    assert part.names[0] == "stem" or part.names[0] == "blocks.0"
    # the blocks are the model's own modules, not copies
    own = {id(m) for m in model.modules()}
    assert all(id(b) in own for b in part.blocks[1:])


def test_partition_reproduces_forward_features_and_top() -> None:
    model = timm.create_model("resnet18", num_classes=5).eval()
    part = partition(model, input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = part.forward_features(x)
        assert torch.allclose(h, model.forward_features(x))
        assert torch.allclose(part.top(h), model(x))


def test_wrong_cut_is_detected() -> None:
    """A cut that skips a module forward_features runs must not pass verification."""
    from timm_local.families.resnet import ResNetFamily

    class SkippingAdapter(ResNetFamily):
        def local_blocks(self, model):
            return super().local_blocks(model)[:-1]

    model = timm.create_model("resnet20_cifar")
    adapter = SkippingAdapter()
    named = adapter.local_blocks(model)
    with torch.no_grad():
        h = torch.randn(1, 3, 32, 32)
        for _, b in named:
            h = b(h)
    from timm_local.families import adapter_for, register_family

    original = type(adapter_for(model))
    register_family(SkippingAdapter)
    try:
        with pytest.raises(RuntimeError, match="does not reproduce model.forward_features"):
            partition(model)
    finally:
        register_family(original)


class TinyNet(nn.Module):
    """A model of no family: the generic cut finds no blocks in it."""

    def forward_features(self, x):
        return x


def _refuse_tiny_net() -> None:
    partition(TinyNet())


def _refuse_crossvit() -> None:
    # (a ViT is cut by the generic family; CrossViT's two token branches are not one tensor)
    timm_local.create_local_model(timm.create_model("crossvit_tiny_240", num_classes=10), "auglocal")


@pytest.mark.parametrize("refused, class_name", [(_refuse_tiny_net, "TinyNet"), (_refuse_crossvit, "CrossVit")],
                         ids=["partition_of_a_plain_module", "local_model_of_crossvit"])
def test_an_unsupported_model_is_refused_naming_every_family_and_the_guide(refused, class_name) -> None:
    with pytest.raises(NotImplementedError) as info:
        refused()
    message = str(info.value)
    assert class_name in message
    for family in timm_local.list_families():
        assert family in message
    assert "register_family" in message and "docs/families.md" in message


def test_an_unsupported_model_is_one_line_and_exit_code_2_at_the_command_line(capsys) -> None:
    from timm_local.cli import command_line_errors, handle_errors

    assert handle_errors(lambda _: partition(TinyNet()), [], command_line_errors()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: timm_local cannot cut a TinyNet into local blocks") and err.count("\n") == 1


@pytest.mark.parametrize("index, in_chs, stride", [(30, 16, 2), (54, 32, 1), (54, 64, 2)])
def test_make_block_like_copies_architecture_not_weights(index, in_chs, stride) -> None:
    model = timm.create_model("resnet110_cifar")
    part = partition(model)
    block = part.make_block_like(index, in_chs, stride)
    primary = part.blocks[index]
    assert type(block) is type(primary)
    assert block.conv1.in_channels == in_chs and block.conv1.stride == (stride, stride)
    assert block.conv2.out_channels == primary.conv2.out_channels
    assert (block.downsample is None) == (in_chs == part.specs[index].out_chs and stride == 1)
    assert not torch.equal(block.conv2.weight, primary.conv2.weight)
    assert torch.all(block.bn2.weight == 1) and torch.all(block.bn2.bias == 0)
    out = block(torch.randn(2, in_chs, 16, 16))
    assert out.shape == (2, part.specs[index].out_chs, 16 // stride, 16 // stride)


def test_bottleneck_copy_keeps_group_width() -> None:
    model = timm.create_model("resnet50d", num_classes=10)
    part = partition(model, input_size=(3, 64, 64))
    block = part.make_block_like(16, 1024, 2)
    primary = part.blocks[16]
    assert block.conv2.groups == primary.conv2.groups
    assert block.conv2.out_channels == primary.conv2.out_channels
    assert block(torch.randn(1, 1024, 4, 4)).shape == (1, 2048, 2, 2)
