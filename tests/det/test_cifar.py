"""timm_local's CIFAR architectures as detectron2 backbones, through the plug-in's registry builders.

The CIFAR ResNets' feature_info follows timm's ResNet (0 = stem, i = layer i) but their stem and
layer1 both run at stride 1: out_indices 1, 2, 3 give strides 1, 2, 4 (res0..res2, doubling as
FPN needs); selecting the stem as well is refused with a reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")

import timm  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402

import det  # noqa: E402

from tests.helpers import ROOT



def _cfg(name: str, out_indices: list[int], *opts: object) -> CfgNode:
    """The shipped FPN recipe with a CIFAR backbone, random init, plain BN, nothing frozen."""
    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "det" / "mask_rcnn_R34_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.TIMM.NAME", name, "MODEL.TIMM.NORM", "BN", "MODEL.TIMM.FREEZE_AT", "0",
                         "MODEL.FPN.OUT_CHANNELS", "32", *[str(o) for o in opts]])
    cfg.MODEL.TIMM.OUT_INDICES = out_indices
    return cfg


@pytest.mark.parametrize(
    "name, out_indices, expected",
    [
        ("resnet20_cifar", [1, 2, 3], {"res0": (16, 1), "res1": (32, 2), "res2": (64, 4)}),
        ("vgg19_cifar", [1, 2, 3, 4], {"res2": (128, 4), "res3": (256, 8), "res4": (512, 16), "res5": (512, 32)}),
    ],
)
def test_cifar_backbone_with_fpn(name: str, out_indices: list[int], expected: dict[str, tuple[int, int]]) -> None:
    cfg = _cfg(name, out_indices, "MODEL.FPN.IN_FEATURES", str(list(expected)))
    fpn = build_backbone(cfg)
    backbone = fpn.bottom_up
    assert isinstance(backbone, det.TimmBackbone)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == expected
    assert backbone.size_divisibility == max(s for _, s in expected.values())

    x = torch.randn(2, 3, 32, 64)
    reference = timm.create_model(name, features_only=True, out_indices=tuple(out_indices)).eval()
    reference.load_state_dict(backbone.body.state_dict())  # same wrapper, same weights
    with torch.no_grad():
        ours = backbone.eval()(x)
        theirs = reference(x)
        pyramid = fpn.eval()(x)
    assert list(ours) == list(expected)
    for (out_name, a), b in zip(ours.items(), theirs):
        channels, stride = expected[out_name]
        assert a.shape == (2, channels, 32 // stride, 64 // stride)
        assert torch.equal(a, b), out_name
    # FPN: one level per input stride, plus the max-pooled level above the deepest
    levels = [int(n[3:]) for n in expected]
    assert {k: (v.shape[1], 64 // v.shape[3]) for k, v in pyramid.items()} == {
        f"p{level}": (32, 2**level) for level in [*levels, levels[-1] + 1]
    }


def test_cifar_resnet_export_loads_exactly(tmp_path: Path) -> None:
    """A CIFAR ResNet exported like timm_local's runs is the detectron2 backbone, bit for bit."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar")
    with torch.no_grad():  # non-default statistics, so skipped or mixed-up BN buffers would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    export = tmp_path / "export"
    timm.models.save_for_hf(model, export, safe_serialization=True)

    cfg = _cfg("", [1, 2, 3], "MODEL.TIMM.WEIGHTS", str(export), "MODEL.FPN.IN_FEATURES", "['res0', 'res1', 'res2']")
    backbone = build_backbone(cfg).bottom_up
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = list(backbone.eval()(x).values())
        _, theirs = model.eval().forward_intermediates(x, indices=[1, 2, 3])
    assert len(ours) == 3
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_freeze_at_follows_cifar_feature_info() -> None:
    """FREEZE_AT 2 = stem + layer1 (feature_info 0 and 1), as for timm's ResNets."""
    body = build_backbone(_cfg("resnet20_cifar", [1, 2, 3], "MODEL.TIMM.FREEZE_AT", "2",
                               "MODEL.FPN.IN_FEATURES", "['res0', 'res1', 'res2']")).bottom_up.body
    assert not body.conv1.weight.requires_grad and not body.layer1[2].conv2.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer3[2].conv2.weight.requires_grad


def test_fpn_in_features_that_the_backbone_lacks_is_a_clear_error() -> None:
    """The recipe's IN_FEATURES res2..res5 name a four-stage ResNet's outputs, not a CIFAR ResNet's."""
    with pytest.raises(ValueError, match=r"IN_FEATURES=\['res2', 'res3', 'res4', 'res5'\].*\['res0', 'res1', 'res2'\]"):
        build_backbone(_cfg("resnet20_cifar", [1, 2, 3]))


def test_stem_and_layer1_share_stride_1_clear_error() -> None:
    with pytest.raises(ValueError, match=r"selects two features of stride 1; pick one index per stride"):
        det.TimmBackbone("resnet20_cifar", out_indices=(0, 1, 2, 3), norm="BN")


def test_resnet_default_out_indices_do_not_fit_a_cifar_resnet() -> None:
    """The recipe's [1, 2, 3, 4] is for four-stage ResNets: the error lists the three-stage model's features."""
    with pytest.raises(ValueError, match=r"resnet20_cifar: out_indices=\(1, 2, 3, 4\) is out of range.*3 = layer3"):
        det.TimmBackbone("resnet20_cifar", out_indices=(1, 2, 3, 4), norm="BN")


def test_importing_det_registers_the_cifar_models() -> None:
    """MODEL.TIMM.NAME can name a CIFAR model in a fresh process that imports only det (as tools/ do)."""
    code = "import det, timm; print(timm.create_model('resnet20_cifar', features_only=True).feature_info.reduction())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[1, 2, 4]"
