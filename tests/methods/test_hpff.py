"""HPFF (methods/hpff.py) against its official CIFAR code (Zeudfish/HPFF, network/resnetInfoPro_HPFF.py and
network/auxiliary_net.py): the heads, the cascade one module back, the patch decoder.

(Its resume, with MAN's, is in tests/methods/test_man.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import timm_local
from timm_local.cost import peak_step_memory
from timm_local.engine.ownership import refuse_cross_segment_reads
from timm_local.methods.hpff import PatchDecoder, quadrants

from tests.helpers import stages_reached

# HPFF's official head (auxiliary_net.py with InfoPro's published 1c2f cross-entropy classifier, 10 classes) on
# a module ending at width C: net_classifier(C) + aux_classifier(C) + the patch Decoder(C) of four InfoPro
# decoders: 2 * 10,186 + 4 * 2,091 (C = 16); 2 * 28,170 + 4 * 3,819 (32); 2 * 46,602 + 4 * 7,275 (64).
HPFF16, HPFF32, HPFF64 = 2 * 10186 + 4 * 2091, 2 * 28170 + 4 * 3819, 2 * 46602 + 4 * 7275


@pytest.mark.parametrize("model, k, expected", [
    ("resnet32_cifar", 4, [HPFF32, HPFF64]),                   # modules 1, 2 end at layer2.1, layer3.0
    ("resnet32_cifar", 8, [HPFF16, HPFF16, HPFF32, HPFF32, HPFF64, HPFF64]),
    ("resnet110_cifar", 4, [HPFF32, HPFF64]),                  # layer2.7, layer3.3
])
def test_hpff_head_parameters_equal_the_official_heads(model: str, k: int, expected: list[int]) -> None:
    lm = timm_local.create_local_model(model, "hpff", method_kwargs=dict(local_modules=k))
    assert [sum(p.numel() for p in h.parameters()) for h in lm.heads] == expected
    assert [s.has_loss for s in lm.stages] == [False] + [True] * (k - 1)
    assert [s.cascade for s in lm.stages] == [None] + [(0.001, 0.999)] * (k - 1)


def _model() -> timm_local.LocalModel:
    """HPFF on resnet20_cifar at 16x16 pixels, K = 4."""
    torch.manual_seed(0)
    return timm_local.create_local_model("resnet20_cifar", "hpff", pretrained_cfg_overlay=dict(input_size=(3, 16, 16)),
                                         method_kwargs=dict(local_modules=4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_hpff_cascade_reaches_exactly_one_module_back() -> None:
    model = _model().train()
    reached = stages_reached(model, *_batch(0))
    assert reached == [{0, 1}, {1, 2}, {2, 3}]  # stage 0 has no loss: trained only by stage 1's cascade
    out = model.local_step(*_batch(1))
    assert float(out.losses[0]) == 0.0 and all(float(v) > 0 for v in out.losses[1:])


def test_patch_decoder_reconstructs_each_quadrant_with_its_own_decoder() -> None:
    torch.manual_seed(0)
    decoder = PatchDecoder(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    features, image = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 16, 16)
    expected = 0.0
    for i, (rows, cols) in enumerate([(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)),
                                      (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 4))]):
        quad = features[:, :, rows, cols]
        image_quad = image[:, :, rows.start * 4:rows.stop * 4, cols.start * 4:cols.stop * 4]
        up = F.interpolate(quad, size=(8, 8), mode="bilinear", align_corners=True)
        target = (image_quad * 0.25 + 0.5).clamp(0, 1)
        expected = expected + F.binary_cross_entropy_with_logits(decoder.decoders[i].decoder(up), target)
    assert torch.allclose(decoder.loss(features, image), expected)


def test_hpff_cascade_costs_memory_and_macs_beyond_infopro() -> None:
    """The cascade keeps two modules' graphs alive and runs each middle module three times."""
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    costs = {}
    for method in ("infopro", "hpff"):
        torch.manual_seed(0)
        model = timm_local.create_local_model("resnet32_cifar", method, method_kwargs=dict(local_modules=4))
        costs[method] = peak_step_memory(model, x, y)["peak_memory_bytes"]
    assert costs["hpff"] > costs["infopro"]


def test_pipeline_refuses_cascade_stages() -> None:
    with pytest.raises(ValueError, match="hpff's local stage 1 reaches back into stage 0.*--engine sequential"):
        refuse_cross_segment_reads(_model(), [range(0, 4)])


def test_quadrants_of_a_one_pixel_side_take_the_whole_side() -> None:
    t = torch.arange(6.0).view(1, 1, 1, 6)
    assert [q.flatten().tolist() for q in quadrants(t)] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] * 2
