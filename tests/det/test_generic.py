"""The detectron2 plug-in with a backbone the generic family trains: a ConvNeXt, not a ResNet.

The backbone goes through timm's ``features_only`` like any other, so what the generic cut trains
with AugLocal and exports is what detectron2 gets, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")

import timm  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402

import det  # noqa: E402
import timm_local  # noqa: E402

from tests.helpers import ROOT



@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/export of a ConvNeXt trained by one AugLocal step through the generic cut."""
    torch.manual_seed(0)
    lm = timm_local.create_local_model("convnext_atto", "auglocal", aux_depth=3, num_classes=10,
                                       input_size=(3, 64, 64))
    assert lm.partition.adapter.name == "generic"
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.05)
    lm.local_step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    optimizer.step()  # weights now differ from any fresh init
    run = tmp_path_factory.mktemp("run_convnext")
    timm_local.export_backbone(lm.backbone, run / "export")
    return run


def test_generic_cnn_backbone_features_equal_timm(convnext_run: Path) -> None:
    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.TIMM.NAME", "convnext_atto", "MODEL.TIMM.WEIGHTS", str(convnext_run),
                         "MODEL.TIMM.OUT_INDICES", "[0, 1, 2, 3]", "MODEL.TIMM.NORM", "BN",
                         "MODEL.TIMM.FREEZE_AT", "0"])
    fpn = build_backbone(cfg)
    backbone = fpn.bottom_up
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "res2": (40, 4), "res3": (80, 8), "res4": (160, 16), "res5": (320, 32)}
    x = torch.randn(2, 3, 64, 96)
    reference = timm.create_model(f"local-dir:{convnext_run / 'export'}", pretrained=True, features_only=True,
                                  out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        ours, theirs = backbone.eval()(x), reference(x)
        pyramid = fpn.eval()(x)
    for (name, a), b in zip(ours.items(), theirs):
        assert torch.equal(a, b), name
    assert {k: v.shape[-1] for k, v in pyramid.items()} == {"p2": 24, "p3": 12, "p4": 6, "p5": 3, "p6": 2}
