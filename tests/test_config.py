"""Recipes and configuration: every configs/ file is a valid run with the paper's hyper-parameters."""
from __future__ import annotations


import pytest
import timm

import timm_local
from timm_local.cli import parse_config
from timm_local.config import TrainConfig, config_from_dict, load_yaml
from tests.helpers import ROOT

CONFIGS = ROOT / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if "det" not in p.relative_to(CONFIGS).parts
                 and not p.name.startswith("_"))

PAPER = {  # (batch, lr, epochs) from docs/spec.md §5
    "cifar10": (1024, 0.8, 400), "svhn": (1024, 0.8, 400), "stl10": (128, 0.1, 400),
    "imagenet/vgg13_bn": (256, 0.1, 90), "imagenet/resnet34": (1024, 0.4, 200),
    "imagenet/resnet101": (512, 0.2, 200),
}


def test_there_is_a_recipe_for_every_paper_run_and_method():
    names = {p.relative_to(CONFIGS).as_posix() for p in RECIPES}
    for dataset in ("cifar10", "svhn", "stl10"):
        for model in ("resnet32_cifar", "resnet110_cifar", "vgg19_cifar"):
            for method in ("bp", "checkpoint", "dgl", "predsim", "infopro", "auglocal_infopro"):
                assert f"{dataset}/{model}/{method}.yaml" in names
            for d in range(2, 7):
                assert f"{dataset}/{model}/auglocal_d{d}.yaml" in names
    for model in ("vgg13_bn", "resnet34", "resnet101"):
        assert f"imagenet/{model}/auglocal_d3.yaml" in names and f"imagenet/{model}/bp.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_each_recipe_builds_with_the_papers_hyper_parameters(path):
    cfg = config_from_dict(load_yaml(path))
    assert timm.is_model(cfg.model), f"{cfg.model} is not in timm's registry"
    assert cfg.method in timm_local.list_methods()
    kwargs = dict(cfg.method_kwargs)
    if cfg.aux_depth is not None:
        kwargs["aux_depth"] = cfg.aux_depth
    if cfg.tau is not None:
        kwargs["tau"] = cfg.tau
    timm_local.create_method(cfg.method, **kwargs)  # the method accepts the recipe's hyper-parameters
    rel = path.relative_to(CONFIGS).as_posix()
    key = next((k for k in PAPER if rel.startswith(k + "/")), None)
    if key is not None:
        assert (cfg.batch_size, cfg.lr, cfg.epochs) == PAPER[key]
        assert (cfg.opt, cfg.momentum, cfg.weight_decay, cfg.sched) == ("sgd", 0.9, 1e-4, "cosine")
        assert cfg.warmup_epochs > 0 and cfg.dataset == key.split("/")[0]
        if "auglocal_d" in path.name:
            assert cfg.aux_depth == int(path.stem[-1]) and cfg.tau == 0.5
            # the paper's VGG13 gives its auxiliary classifiers hidden width 512; the other recipes pool + linear
            assert cfg.method_kwargs.get("head_hidden", 0) == (512 if key == "imagenet/vgg13_bn" else 0)


def test_command_line_overrides_the_recipe_and_bases_merge(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("lr: 0.8\nbatch_size: 1024\nmethod_kwargs: {a: 1, b: 2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nlr: 0.4\nmethod_kwargs: {b: 3}\n")
    cfg = parse_config(["--config", str(child), "--batch-size", "64", "--aux_depth", "4", "--tau", "none",
                        "--no-augment", "--mean", "0.5"])
    assert (cfg.lr, cfg.batch_size, cfg.aux_depth, cfg.tau, cfg.augment) == (0.4, 64, 4, None, False)
    assert cfg.method_kwargs == {"a": 1, "b": 3} and cfg.mean == [0.5]
    assert parse_config([]) == TrainConfig()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'bach_size'"):
        config_from_dict({"bach_size": 3})
    with pytest.raises(ValueError, match="'epochs'.*int"):
        config_from_dict({"epochs": "many"})
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("model, batch, lr, warmup", [("deit_tiny_patch16_224", 1024, 1e-3, 5),
                                                      ("convnext_tiny", 4096, 4e-3, 20)])
def test_the_transformer_and_convnext_recipes_follow_their_papers(model, batch, lr, warmup):
    for method in ("bp", "auglocal_d3"):
        cfg = config_from_dict(load_yaml(CONFIGS / "imagenet" / model / f"{method}.yaml"))
        assert (cfg.model, cfg.batch_size, cfg.lr, cfg.warmup_epochs, cfg.epochs) == (model, batch, lr, warmup, 300)
        assert (cfg.opt, cfg.weight_decay, cfg.sched, cfg.smoothing, cfg.mixup, cfg.cutmix) == (
            "adamw", 0.05, "cosine", 0.1, 0.8, 1.0)
        assert cfg.aa.startswith("rand-m9") and cfg.reprob == 0.25 and cfg.drop_path_rate == 0.1 and cfg.model_ema


def test_the_fine_tuning_recipe_starts_from_pretrained_weights():
    cfg = config_from_dict(load_yaml(CONFIGS / "finetune" / "cifar10_resnet50_auglocal_d3.yaml"))
    assert cfg.pretrained and cfg.initial_checkpoint is None and cfg.lr < 0.8 and cfg.mean == [0.485, 0.456, 0.406]
