"""Recipes in every local loss: label smoothing and mixup targets change each head's loss and the network's
own as the formula says, for every method; a method whose losses need labels says so in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target

import timm_local
from timm_local.config import ConfigError, TrainConfig
from timm_local.model import create_local_model
from timm_local.training.targets import Targets

C = 10
SOFT_METHODS = sorted(m for m in timm_local.list_methods() if m != "predsim")


def losses_of(lm, x, target) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every stage's loss and logits (the network's for the last stage), without a step."""
    with torch.no_grad():
        out = lm.local_step(x, target, backward=lambda loss: None)
    logits = [h if h is not None else out.logits for h in out.head_logits]
    return out.losses, logits


def ce_weight(head) -> float:
    """The weight of a head's classification term (InfoPro's lambda_y; 1 for a plain cross-entropy head)."""
    return 1.0 if head is None else getattr(head, "lambda_y", 1.0)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 3, 16, 16), torch.randint(0, C, (8,))


@pytest.mark.parametrize("method", SOFT_METHODS)
def test_smoothing_and_mixup_change_every_loss_as_the_formula_says(method, batch):
    x, y = batch
    torch.manual_seed(0)
    lm = create_local_model("resnet20_cifar", method, num_classes=C, input_size=(3, 16, 16)).eval()
    hard, logits = losses_of(lm, x, y)
    s, lam = 0.1, 0.7
    smoothed, _ = losses_of(lm, x, mixup_target(y, C, smoothing=s))
    mixed, _ = losses_of(lm, x, mixup_target(y, C, lam=lam))
    for stage, h, sm, mx, z in zip(lm.stages, hard, smoothed, mixed, logits):
        if not getattr(stage, "has_loss", True):  # a module's inner stage: no loss of its own
            assert h == sm == mx == 0
            continue
        if getattr(stage, "cascade", None) is not None:  # its cascade classifier's logits are not returned:
            assert not torch.equal(sm, h) and not torch.equal(mx, h)  # the targets reach it, at least
            continue
        ce = F.cross_entropy(z, y)
        w = ce_weight(stage.head)
        # smoothing: (1 - s) * CE(label) + s * mean over classes of -log p; the rest of the loss is unchanged
        expected = (1 - s) * ce + s * (-F.log_softmax(z, dim=1)).mean(1).mean()
        torch.testing.assert_close(sm - h, w * (expected - ce), rtol=1e-4, atol=1e-5)
        # mixup with the flipped batch: lam * CE(label) + (1 - lam) * CE(partner's label)
        expected = lam * ce + (1 - lam) * F.cross_entropy(z, y.flip(0))
        torch.testing.assert_close(mx - h, w * (expected - ce), rtol=1e-4, atol=1e-5)
    assert len(hard) == len(lm.stages) >= (1 if method in ("bp", "checkpoint") else 2)


def test_the_loop_mixes_with_timms_mixup(batch):
    x, y = batch
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, smoothing=0.1)
    method = timm_local.methods.create_method("auglocal")
    np.random.seed(3)
    ours = Targets(cfg, C, method)(x.clone(), y)
    np.random.seed(3)
    timms = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=C)(x.clone(), y)
    assert torch.equal(ours[0], timms[0]) and torch.equal(ours[1], timms[1])
    assert not torch.equal(ours[0], x)
    smoothed = Targets(TrainConfig(smoothing=0.2), C, method)(x, y)[1]
    torch.testing.assert_close(smoothed.sum(1), torch.ones(8))
    assert torch.equal(smoothed.argmax(1), y) and smoothed.min() == pytest.approx(0.2 / C)


def test_a_method_that_needs_labels_says_so(batch):
    with pytest.raises(ConfigError, match="method 'predsim' cannot take --smoothing / --mixup / --cutmix: its "
                                          "similarity-matching loss"):
        Targets(TrainConfig(smoothing=0.1), C, timm_local.methods.create_method("predsim"))
    with pytest.raises(ConfigError, match="even"):
        Targets(TrainConfig(mixup=0.2), C, timm_local.methods.create_method("bp")).check_batch(7)


RECIPE = ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1"]


@pytest.mark.slow
def test_mixed_targets_train_alike_on_both_engines(cifar, tmp_path):
    """Timm's Mixup on the first segment, the mixed targets sent downstream with the activations: two
    pipeline segments train what the sequential engine trains."""
    from safetensors.torch import load_file

    from tests.helpers import torchrun
    from tests.helpers import train

    common = ["--dataset", "cifar10", "--data-dir", cifar, "--model", "resnet20_cifar", "--method", "auglocal",
              "--epochs", "2", *RECIPE]
    assert train(*common, "--output-dir", tmp_path / "seq") == 0
    proc = torchrun(2, ["--image-size", "8", "--batch-size", "8", "--workers", "0", "--trackers", "none", "--lr",
                        "0.05", "--log-every", "1", "--seed", "0", *common, "--engine", "pipeline",
                        "--pipeline-segments", "2", "--pipeline-cost", "macs", "--output-dir", tmp_path / "pipe"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    seq, pipe = (load_file(str(tmp_path / run / "export" / "model.safetensors")) for run in ("seq", "pipe"))
    assert [k for k in seq if not torch.allclose(seq[k], pipe[k], rtol=1e-4, atol=1e-6)] == []
