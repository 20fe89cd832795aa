"""Our CIFAR architectures behave like timm models."""
import pytest
import timm
import torch

import timm_local  # noqa: F401  (registers the models)


@pytest.mark.parametrize(
    "name, millions, tolerance",
    [
        ("resnet20_cifar", 0.27, 0.01),
        ("resnet32_cifar", 0.46, 0.01),  # He et al. 2016, Table 6
        ("resnet56_cifar", 0.85, 0.01),
        ("resnet110_cifar", 1.7, 0.04),
        ("vgg19_cifar", 20.0, 0.1),
    ],
)
def test_parameter_counts_match_literature(name: str, millions: float, tolerance: float) -> None:
    model = timm.create_model(name, num_classes=10)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) <= tolerance


@pytest.mark.parametrize("name", ["resnet20_cifar", "vgg19_cifar"])
def test_cifar_models_have_timms_features_head_and_classifier_interface(name: str) -> None:
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape[1] == model.num_features
    assert torch.equal(model.forward_head(features), model(x))
    assert model(x).shape == (2, 7)
    assert model.default_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["mean"] == (0.4914, 0.4822, 0.4465)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_cifar_models_are_listed_by_timm() -> None:
    assert {"resnet20_cifar", "resnet32_cifar", "resnet56_cifar", "resnet110_cifar", "vgg19_cifar"} <= set(
        timm.list_models("*_cifar")
    )


def test_resnet_depth_must_be_6n_plus_2() -> None:
    from timm_local.models import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=33)
