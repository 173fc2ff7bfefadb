"""Pre-activation ResNet for 32×32 inputs (bearpaw ``models/cifar/preresnet.py``)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._init import he_conv_unit_bn_
from .resnet import block_depth, conv3x3

__all__ = ["PreResNet", "preresnet"]


class PreBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class PreResNet(nn.Module):
    """CIFAR pre-activation ResNet: conv 3→16, three stages (16/32/64·expansion
    channels), final BN → ReLU → 8×8 average pool → ``fc = Linear(64·expansion, K)``.
    Shortcut projections are a bare 1×1 conv (no BN). Init as :class:`~.resnet.ResNet`.
    """

    def __init__(self, depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> None:
        super().__init__()
        name = block_name.lower()
        if name == "basicblock":
            block: type = PreBasicBlock
        elif name == "bottleneck":
            block = PreBottleneck
        else:
            raise ValueError(f"block_name must be 'BasicBlock' or 'Bottleneck', got {block_name!r}")
        n = block_depth(depth, block_name)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        he_conv_unit_bn_(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


def preresnet(depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> PreResNet:
    """CIFAR pre-activation ResNet of any valid ``depth``."""
    return PreResNet(depth=depth, num_classes=num_classes, block_name=block_name)
