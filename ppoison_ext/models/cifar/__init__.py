"""CIFAR-family architectures (32×32 inputs), from bearpaw's ``pytorch-classification``
and the reference's zoo (``knockoff/models/cifar``). Layer names match the reference's so
its checkpoints load by name.

Every model ends in one ``nn.Linear`` whose output is the logits.
"""

from .alexnet import AlexNet, alexnet
from .densenet import DenseNet, densenet
from .preresnet import PreResNet, preresnet
from .resnet import ResNet, resnet, resnet18, resnet34, resnet50
from .resnext import CifarResNeXt, resnext
from .vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn
from .wresnet import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

# name -> constructor, in the reference's export order.
BUILDERS = {
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg11_bn": vgg11_bn,
    "vgg13": vgg13,
    "vgg13_bn": vgg13_bn,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "vgg19": vgg19,
    "vgg19_bn": vgg19_bn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet": resnet,
    "resnext": resnext,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "preresnet": preresnet,
    "densenet": densenet,
}

__all__ = [
    "BUILDERS",
    "AlexNet", "DenseNet", "PreResNet", "ResNet", "CifarResNeXt", "VGG", "WideResNet",
    *BUILDERS,
]
