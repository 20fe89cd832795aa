"""docs/families.md's worked example, run as written.

The guide's ```python blocks are executed in order as one module, so the documentation cannot
drift from what works; the assertions then check what the guide claims.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import timm
import torch
import torch.nn as nn

import timm_local
from timm_local.families import unregister_family
from timm_local.partition import partition
from tests.helpers import ROOT

GUIDE = ROOT / "docs" / "families.md"
MODULE_NAME = "timm_local_docs_families_example"


@pytest.fixture(scope="module")
def example() -> Iterator[types.ModuleType]:
    """The guide's code, executed as a real module (timm's register_model needs one)."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 3, "the guide should have 3 python blocks: model, adapter, usage"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = types.ModuleType(MODULE_NAME)
    sys.modules[MODULE_NAME] = module
    try:
        exec(compile("\n".join(blocks), str(GUIDE), "exec"), module.__dict__)
        yield module
    finally:
        torch.set_num_threads(previous_threads)


def test_guide_registers_family(example: types.ModuleType) -> None:
    assert "mynet" in timm_local.list_families()
    assert "mynet" in timm.list_models("mynet")


def test_guide_partition_and_training(example: types.ModuleType) -> None:
    lm = example.lm
    assert lm.partition.adapter.name == "mynet"
    assert lm.partition.names == ["stem"] + [f"stages.{i}.{j}" for i in range(3) for j in range(2)]
    # 7 blocks, aux_depth 3 -> K = 7 - 2 = 5, heads on blocks 0..3, then the final stage
    assert len(lm.heads) == 4
    assert len(example.out.losses) == 5
    assert all(torch.isfinite(loss) for loss in example.out.losses)
    assert example.out.logits.shape == (8, 10)


def test_guide_local_losses_decrease(example: types.ModuleType) -> None:
    """The guide trains 3 steps on one batch; a few more must lower every local loss."""
    lm, x, y = example.lm, example.x, example.y
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.05, momentum=0.9)
    first = torch.stack(lm.local_step(x, y).losses)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        last = torch.stack(lm.local_step(x, y).losses)
        optimizer.step()
    assert (last < first).all(), (first.tolist(), last.tolist())


def test_guide_copies_rebuild_the_primary_block(example: types.ModuleType) -> None:
    model = timm.create_model("mynet", kernel_size=5)
    p = partition(model)
    for j in range(1, len(p)):
        stride = p.specs[j].reduction // p.specs[j - 1].reduction
        copy_j = p.make_block_like(j, p.specs[j - 1].out_chs, stride)
        assert isinstance(copy_j, example.MyBlock)
        assert repr(copy_j) == repr(p.blocks[j])  # kernel 5, same shortcut, same widths


def test_guide_missing_module_is_caught(example: types.ModuleType) -> None:
    """The verification the guide promises: an adapter that forgets a block cannot train."""

    class OtherNet(example.MyNet):
        pass

    class Forgetful(example.MyNetFamily):
        name = "forgetful"
        model_classes = (OtherNet,)

        def local_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
            return super().local_blocks(model)[:-1]

    timm_local.register_family(Forgetful)
    try:
        with pytest.raises(RuntimeError, match="does not reproduce model.forward_features"):
            partition(OtherNet(), input_size=(3, 32, 32))
    finally:
        unregister_family(Forgetful)  # keep the broken adapter out of the other tests


def test_guide_backbone_exports_as_timm_model(example: types.ModuleType, tmp_path: Path) -> None:
    lm, x = example.lm, example.x
    lm.eval()
    with torch.no_grad():
        expected = lm(x)
    timm.models.save_for_hf(lm.backbone, tmp_path, safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
