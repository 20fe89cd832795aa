"""Architectures the paper uses that timm lacks, registered into timm's own registry.

Importing this package is enough: afterwards ``timm.create_model("resnet110_cifar")`` works
like any timm model name. ``__all__`` names the model classes, for ``isinstance`` checks and subclasses.
"""
from .cifar_resnet import CifarResNet
from .cifar_vgg import CifarVgg, VggConvBlock

__all__ = ["CifarResNet", "CifarVgg", "VggConvBlock"]
