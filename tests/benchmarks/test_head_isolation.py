"""benchmarks/head_isolation.py: its variants are what they say they are, and a tiny run reports them."""
from __future__ import annotations

import json

import pytest
import timm
import torch.nn as nn

import timm_local
from tests.helpers import ROOT, load_module, write_mnist_idx
from timm_local.methods.auglocal import auglocal_plans

iso = load_module("_head_isolation", ROOT / "benchmarks" / "head_isolation.py")


@pytest.mark.parametrize("depth", [2, 4, 6])
def test_paper_variants_are_auglocals_own_first_head(depth):
    specs = timm_local.partition(timm.create_model("resnet32_cifar")).specs
    plan = auglocal_plans(specs, depth, 0.5)[0]
    variant = iso.VARIANTS[f"d{depth}_paper"]
    assert (variant.selection, variant.strides, variant.norm) == (plan.selection, plan.strides, None)


def test_variant_heads_end_as_described():
    def last_block(name):
        _, head = iso.build_stage0(iso.VARIANTS[name], 10, 32)
        return head, head.layers[-1]

    head, block = last_block("d4_paper")
    assert block.downsample is not None and block.conv1.stride == (2, 2) and isinstance(head.norm, nn.Identity)
    head, block = last_block("d4_bn1d")
    assert block.downsample is not None and isinstance(head.norm, nn.BatchNorm1d)
    _, block = last_block("3blk_identity_end")
    assert block.downsample is None
    _, block = last_block("3blk_projection_end")
    assert block.downsample is not None and block.conv1.stride == (1, 1)
    assert (block.conv1.in_channels, block.conv2.out_channels) == (32, 64)
    head, _ = last_block("d2_paper")
    assert len(head.layers) == 1 and isinstance(head.norm, nn.BatchNorm1d)


def test_a_tiny_run_writes_each_variants_json_and_table(tmp_path):
    write_mnist_idx(tmp_path / "data", n_train=40, n_test=10, size=8)
    iso.main(["--data-dir", str(tmp_path / "data"), "--train-subset", "20", "--epochs", "1", "--seeds", "0",
              "--batch-size", "10", "--image-size", "8", "--variants", "d4_paper", "d4_bn1d",
              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "head_isolation_fashion_mnist.json").read_text())
    assert list(saved["results"]) == ["d4_paper", "d4_bn1d"]
    for name, bn in (("d4_paper", False), ("d4_bn1d", True)):
        (r,) = saved["results"][name]
        assert r["bn1d"] is bn and r["head_blocks"] == 3 and len(r["train_loss_per_epoch"]) == 1
        assert r["test_top1"] in [10.0 * k for k in range(11)]  # 10 test images
    table = (tmp_path / "head_isolation_fashion_mnist.md").read_text()
    assert "| d4_bn1d |" in table and "| yes |" in table
