"""VGG for 32×32 inputs (bearpaw ``models/cifar/vgg.py``)."""

from __future__ import annotations

import math
from typing import List, Union

from torch import Tensor, nn

__all__ = ["VGG", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# Channels per 3×3 conv, "M" = 2×2 max pool. A/B/D/E = VGG-11/13/16/19.
CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``features`` (conv stack, 1×1×512 at 32×32 input) then a single
    ``classifier = Linear(512, K)``.

    Init: conv weights N(0, 2/(9·C_out)) and bias 0, BN weight 1 and bias 0,
    Linear weight N(0, 0.01) and bias 0.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 10) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(512, num_classes)
        self._initialize_weights()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)


def make_layers(cfg: List[Union[int, str]], batch_norm: bool = False) -> nn.Sequential:
    """The VGG feature stack for a channel list (``"M"`` = max pool)."""
    layers: List[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(v)
    return nn.Sequential(*layers)


def _vgg(cfg: str, batch_norm: bool, num_classes: int) -> VGG:
    return VGG(make_layers(CFGS[cfg], batch_norm=batch_norm), num_classes=num_classes)


def vgg11(num_classes: int = 10) -> VGG:
    """VGG-11 (config A)."""
    return _vgg("A", False, num_classes)


def vgg11_bn(num_classes: int = 10) -> VGG:
    """VGG-11 (config A) with batch norm."""
    return _vgg("A", True, num_classes)


def vgg13(num_classes: int = 10) -> VGG:
    """VGG-13 (config B)."""
    return _vgg("B", False, num_classes)


def vgg13_bn(num_classes: int = 10) -> VGG:
    """VGG-13 (config B) with batch norm."""
    return _vgg("B", True, num_classes)


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 (config D)."""
    return _vgg("D", False, num_classes)


def vgg16_bn(num_classes: int = 10) -> VGG:
    """VGG-16 (config D) with batch norm."""
    return _vgg("D", True, num_classes)


def vgg19(num_classes: int = 10) -> VGG:
    """VGG-19 (config E)."""
    return _vgg("E", False, num_classes)


def vgg19_bn(num_classes: int = 10) -> VGG:
    """VGG-19 (config E) with batch norm."""
    return _vgg("E", True, num_classes)
