"""--channels-last and --torchcompile: the same local step, the same export, the timm state_dict keys.

Tiny on purpose: resnet20_cifar at 16x16 pixels, batch 8. Channels-last changes the order of float sums
inside convolutions and batch norm, so losses and gradients agree to float32 rounding, not bitwise.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_local
from timm_local.engine.speed import (compile_blocks_and_heads, match_memory_format, module_memory_format,
                                     use_channels_last)
from timm_local.export import export_backbone

SIZE = (3, 16, 16)


def tiny(method: str, **kwargs) -> timm_local.LocalModel:
    torch.manual_seed(0)
    return timm_local.create_local_model("resnet20_cifar", method, num_classes=10, input_size=SIZE, **kwargs).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, *SIZE, generator=g), torch.randint(0, 10, (8,), generator=g)


def assert_same_step(reference: timm_local.LocalModel, other: timm_local.LocalModel) -> None:
    x, y = batch()
    out_ref, out = reference.local_step(x, y), other.local_step(x, y)
    torch.testing.assert_close(torch.stack(out.losses), torch.stack(out_ref.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-5)
    # float32 rounding relative to the model's gradient scale (a bias in front of a batch norm has a
    # gradient that is zero up to rounding, so its own scale is no yardstick). The rounding depends on the
    # CPU's kernels: up to 1.2e-5 x scale measured (DGL's heads, oneDNN on an AVX2 machine), so 1e-4 x scale;
    # a layout mistake moves gradients by the order of the scale itself.
    scale = max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None)
    for (name, p_ref), p in zip(reference.named_parameters(), other.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("method,kwargs", [("auglocal", {"aux_depth": 2}), ("dgl", {}), ("infopro", {}),
                                           ("checkpoint", {})], ids=["auglocal", "dgl", "infopro", "checkpoint"])
def test_channels_last_local_step_matches_contiguous(method, kwargs) -> None:
    contiguous = tiny(method, **kwargs)
    channels_last = use_channels_last(copy.deepcopy(contiguous))
    conv_weights = [p for p in channels_last.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                for p in conv_weights)  # backbone and heads alike
    assert all(module_memory_format(b) is torch.channels_last for b in channels_last.partition.blocks)
    assert_same_step(contiguous, channels_last)
    grads = [p.grad for p in channels_last.parameters() if p.grad is not None and p.dim() == 4 and p.shape[-1] > 1]
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)  # the step ran channels-last


def test_stage_input_takes_the_first_block_memory_format() -> None:
    lm = use_channels_last(tiny("auglocal", aux_depth=2))
    x, _ = batch()
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert match_memory_format(x, lm.partition.blocks[0]).is_contiguous(memory_format=torch.channels_last)
    plain = tiny("auglocal", aux_depth=2)
    assert match_memory_format(x, plain.partition.blocks[0]) is x  # contiguous models: untouched, no copy


def test_channels_last_export_is_the_contiguous_export(tmp_path: Path) -> None:
    contiguous = tiny("auglocal", aux_depth=2)
    channels_last = use_channels_last(copy.deepcopy(contiguous))
    export_backbone(contiguous.backbone, tmp_path / "a")
    export_backbone(channels_last.backbone, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() == contiguous.backbone.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) and b[k].is_contiguous() for k in a)
    assert not next(channels_last.backbone.parameters()).is_contiguous()  # the trained model is left as it was
    loaded = timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True).eval()
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), contiguous.backbone.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_and_heads_match_eager_and_keep_timm_keys() -> None:
    """The compile wiring (each block and head compiled in place, the per-stage backward kept), checked with
    dynamo + AOTAutograd on eager kernels (``aot_eager``), which must give the eager step exactly. Inductor's
    CPU kernels round differently (docs/memory.md): its gradients are checked for losses only."""
    eager = tiny("auglocal", aux_depth=2)
    compiled = copy.deepcopy(eager)
    assert compile_blocks_and_heads(compiled, backend="aot_eager") == len(compiled.partition.blocks) + len(compiled.heads)
    assert list(compiled.backbone.state_dict()) == list(eager.backbone.state_dict())  # no _orig_mod. prefixes
    x, y = batch()
    out_ref, out = eager.local_step(x, y), compiled.local_step(x, y)
    assert torch.equal(torch.stack(out.losses), torch.stack(out_ref.losses)) and torch.equal(out.logits, out_ref.logits)
    for (name, p_ref), p in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (p_ref.grad is None) and (p.grad is None or torch.equal(p.grad, p_ref.grad)), name
    inductor = copy.deepcopy(tiny("auglocal", aux_depth=2))
    compile_blocks_and_heads(inductor)
    out_inductor = inductor.local_step(x, y)
    torch.testing.assert_close(torch.stack(out_inductor.losses), torch.stack(out_ref.losses), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in inductor.parameters() if p.requires_grad)