"""K local modules: consecutive runs of blocks, one local loss each (methods/modules.py)."""
from __future__ import annotations

import pytest
import torch

import timm_local
from timm_local.balance import min_max_split
from tests.helpers import stages_reached
from timm_local.engine import local_stage_costs
from timm_local.methods.auglocal import module_plans
from timm_local.methods.modules import block_macs, resolve_module_ends

PER_MODULE_METHODS = ["dgl", "predsim", "infopro", "auglocal", "auglocal_infopro", "man"]


def _model(method: str, model: str = "resnet20_cifar", size: int = 16, **kwargs) -> timm_local.LocalModel:
    return timm_local.create_local_model(model, method, pretrained_cfg_overlay=dict(input_size=(3, size, size)),
                                         method_kwargs=kwargs)


# InfoPro's official splits (Experiments on CIFAR-SVHN-STL10/networks/configs.py, table InfoPro), the
# (stage, layer) of each head written as the index of its block (stem = 0, layer s block l =
# 1 + 5 (s - 1) + l for ResNet-32, 1 + 18 (s - 1) + l for ResNet-110), plus the last block.
RESNET32_OFFICIAL = {
    2: [7, 15],                                  # [[2, 1]]
    4: [3, 7, 11, 15],                           # [[1, 2], [2, 1], [3, 0]]
    8: [1, 3, 5, 7, 9, 11, 13, 15],              # [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]]
    16: list(range(16)),                         # [[0, 0], [1, 0] .. [1, 4], [2, 0] .. [2, 4], [3, 0] .. [3, 3]]
}


@pytest.mark.parametrize("k", sorted(RESNET32_OFFICIAL))
def test_infopro_resnet32_default_split_is_the_official_table(k: int) -> None:
    model = timm_local.create_local_model("resnet32_cifar", "infopro", method_kwargs=dict(local_modules=k))
    ends = [stage.blocks[-1] for stage in model.stages]
    assert ends == RESNET32_OFFICIAL[k]
    assert [b for stage in model.stages for b in stage.blocks] == list(range(16))
    assert len(model.heads) == k - 1


def test_official_tables_of_resnet110_and_imagenet_resnets() -> None:
    resnet110 = timm_local.create_local_model("resnet110_cifar", "dgl", method_kwargs=dict(local_modules=4))
    assert [s.blocks[-1] for s in resnet110.stages] == [12, 26, 40, 54]  # [[1, 11], [2, 7], [3, 3]]
    partition = timm_local.partition(__import__("timm").create_model("resnet101"), input_size=(3, 64, 64))
    assert resolve_module_ends(partition, 2) == [4, 33]  # k2_infopro: after layer2[0] = block 1 + 3 + 0
    assert resolve_module_ends(partition, 4) == [8, 17, 25, 33]  # MAN: [[3, 0], [3, 9], [3, 17], [4, 2]]


def test_default_split_elsewhere_balances_block_macs() -> None:
    model = _model("infopro", local_modules=3)
    n = len(model.partition)
    starts = min_max_split(block_macs(model.partition), 3)
    assert [s.blocks[0] for s in model.stages] == starts
    assert [s.blocks[-1] for s in model.stages][-1] == n - 1
    costs = block_macs(model.partition)
    worst = max(sum(costs[i] for i in s.blocks) for s in model.stages)
    assert worst <= sum(costs) / 3 + max(costs)  # no module is more than one block above the mean


def test_explicit_ends_and_their_errors() -> None:
    model = _model("dgl", local_module_ends=[2, 5])
    assert [s.blocks for s in model.stages] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert model.method_config == {"local_module_ends": [2, 5]}
    for kwargs, match in ((dict(local_module_ends=[5, 2]), "increasing"), (dict(local_modules=11), "2..10"),
                          (dict(local_modules=1), ">= 2"), (dict(local_modules=3, local_module_ends=[4]), "give one")):
        with pytest.raises(ValueError, match=match):
            _model("dgl", **kwargs)


@pytest.mark.parametrize("method", PER_MODULE_METHODS)
def test_k_equal_n_given_is_the_per_block_default(method: str) -> None:
    """Per-block rules: K = N given builds what the default builds (AugLocal's default keeps its own
    last D+1 blocks together, so its K = N differs and is checked in docs/method.md's terms below)."""
    torch.manual_seed(0)
    default = _model(method)
    torch.manual_seed(0)
    given = _model(method, local_modules=len(default.partition))
    if method in ("auglocal", "auglocal_infopro"):
        assert len(given.heads) == len(default.partition) - 1 > len(default.heads)
        return
    assert [s.blocks for s in given.stages] == [s.blocks for s in default.stages]
    for a, b in zip(given.heads.state_dict().values(), default.heads.state_dict().values()):
        assert torch.equal(a, b)


def test_module_partition_reproduces_the_backbone_forward() -> None:
    model = _model("infopro", local_modules=4).eval()
    x = torch.randn(2, 3, 16, 16)
    h = x
    with torch.no_grad():
        for stage in model.stages:
            for index in stage.blocks:
                h = model.partition.blocks[index](h)
        assert torch.equal(h, model.backbone.forward_features(x))
        assert torch.equal(model.partition.top(h), model.backbone(x))


@pytest.mark.parametrize("method", PER_MODULE_METHODS)
def test_no_gradient_crosses_a_module_boundary(method: str) -> None:
    """The engine's own step: each module's loss reaches its blocks and head, nothing else."""
    kwargs = dict(local_module_ends=[2, 5]) if method.startswith("auglocal") else dict(local_modules=3)
    if method.startswith("auglocal"):
        kwargs["aux_depth"] = 2
    model = _model(method, **kwargs).train()
    reached = stages_reached(model, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert reached == [{j} for j in range(len(model.stages))]
    assert len(model.stages) == 3 and any(len(s.blocks) > 1 for s in model.stages)


def test_auglocal_module_heads_copy_blocks_after_the_module() -> None:
    """Module m's auxiliary network: a uniform selection of the blocks after its last block (docs/method.md)."""
    model = timm_local.create_local_model("resnet32_cifar", "auglocal", method_kwargs=dict(local_modules=4))
    plans = module_plans(model.partition.specs, [3, 7, 11, 15], aux_depth=3, tau=0.5)
    # depths max(1, round(2 - 0.5 m / 2)) = 2, 2 (1.75), 2 (1.5, half to even); selection
    # round(end + j (15 - end) / 2) for j = 1, 2
    assert [(p.block, p.selection) for p in plans] == [(3, (9, 15)), (7, (11, 15)), (11, (13, 15))]
    assert [(p.block, p.strides) for p in plans] == [(3, (2, 2)), (7, (2, 1)), (11, (1, 1))]
    assert [len(h.layers) for h in model.heads] == [2, 2, 2]
    assert [s.blocks[-1] for s in model.stages] == [3, 7, 11, 15]


def test_pipeline_unit_is_the_module() -> None:
    """The pipeline cuts between local stages; with K modules a stage is a module."""
    model = _model("infopro", local_modules=3)
    costs = local_stage_costs(model, (3, 16, 16), "macs")
    assert len(costs) == 3
    macs = block_macs(model.partition)
    assert all(c >= sum(macs[i] for i in s.blocks) for c, s in zip(costs, model.stages))


def test_command_line_flags_reach_the_method() -> None:
    from timm_local.cli import parse_config
    from timm_local.config import ConfigError, validate_config
    from timm_local.training.builders import method_kwargs

    cfg = parse_config(["--method", "infopro", "--local-modules", "4"])
    assert method_kwargs(cfg) == {"local_modules": 4}
    cfg = parse_config(["--method", "dgl", "--local-module-ends", "[3, 7]"])
    assert method_kwargs(cfg) == {"local_module_ends": [3, 7]}
    with pytest.raises(ConfigError, match="--local-modules must be an integer >= 2"):
        validate_config(parse_config(["--local-modules", "1"]))


MAP_ONLY = {"dgl", "predsim", "infopro", "auglocal_infopro", "man", "man_pp", "hpff"}


@pytest.mark.parametrize("name, size", [("convnext_atto", 64), ("test_vit", 32)])
@pytest.mark.parametrize("method", sorted(set(timm_local.list_methods()) - {"bp", "checkpoint"}))
def test_every_method_at_four_modules_runs_a_step_on_convnext_and_vit(method: str, name: str, size: int) -> None:
    """K = 4 on a generic ConvNeXt and a ViT: a step with finite losses, one per module (HPFF's first module
    has none); on tokens the feature-map methods refuse with the methods that do work, but MAN++ takes its ViT
    variant."""
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=10)
    build = lambda: timm_local.create_local_model(backbone, method, input_size=(3, size, size),  # noqa: E731
                                                  method_kwargs=dict(local_modules=4))
    if name == "test_vit" and method in MAP_ONLY - {"man_pp"}:  # MAN++ has its authors' ViT variant
        with pytest.raises(ValueError, match="feature maps"):
            build()
        return
    model = build()
    modules = 5 if method == "man_pp" and name != "test_vit" else 4  # MAN++'s CNN variant adds a stem module
    assert len(model.stages) == modules
    out = model.local_step(torch.randn(2, 3, size, size), torch.tensor([1, 2]))
    assert len(out.losses) == modules and all(torch.isfinite(v) for v in out.losses)
    assert all(float(v) > 0 for v in out.losses[1 if method == "hpff" else 0:])
