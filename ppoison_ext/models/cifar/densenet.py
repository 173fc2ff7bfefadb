"""DenseNet for 32×32 inputs (bearpaw ``models/cifar/densenet.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import he_conv_unit_bn_

__all__ = ["DenseNet", "densenet"]


class Bottleneck(nn.Module):
    """BN → ReLU → 1×1 conv (4·growth) → BN → ReLU → 3×3 conv (growth), concatenated."""

    def __init__(self, inplanes: int, expansion: int = 4, growthRate: int = 12, dropRate: float = 0):
        super().__init__()
        planes = expansion * growthRate
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, growthRate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropRate = dropRate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        if self.dropRate > 0:
            out = F.dropout(out, p=self.dropRate, training=self.training)
        return torch.cat((x, out), 1)


class BasicBlock(nn.Module):
    """BN → ReLU → 3×3 conv (growth), concatenated."""

    def __init__(self, inplanes: int, expansion: int = 1, growthRate: int = 12, dropRate: float = 0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, growthRate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropRate = dropRate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.dropRate > 0:
            out = F.dropout(out, p=self.dropRate, training=self.training)
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    def __init__(self, inplanes: int, outplanes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, outplanes, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    """CIFAR DenseNet(-BC): three dense blocks with two compressing transitions, then
    BN → ReLU → 8×8 average pool → ``fc = Linear(C, K)``. Defaults: depth 22, growth 12,
    Bottleneck blocks ((depth−4)/6 per block), compression 2. Init as the CIFAR ResNet.
    """

    def __init__(
        self,
        depth: int = 22,
        block: type = Bottleneck,
        dropRate: float = 0,
        num_classes: int = 10,
        growthRate: int = 12,
        compressionRate: int = 2,
    ) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3 if block is BasicBlock else (depth - 4) // 6
        self.growthRate = growthRate
        self.dropRate = dropRate
        self.inplanes = growthRate * 2
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, padding=1, bias=False)
        self.dense1 = self._make_denseblock(block, n)
        self.trans1 = self._make_transition(compressionRate)
        self.dense2 = self._make_denseblock(block, n)
        self.trans2 = self._make_transition(compressionRate)
        self.dense3 = self._make_denseblock(block, n)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(self.inplanes, num_classes)
        he_conv_unit_bn_(self)

    def _make_denseblock(self, block, blocks: int) -> nn.Sequential:
        layers = []
        for _ in range(blocks):
            layers.append(block(self.inplanes, growthRate=self.growthRate, dropRate=self.dropRate))
            self.inplanes += self.growthRate
        return nn.Sequential(*layers)

    def _make_transition(self, compressionRate: int) -> Transition:
        inplanes = self.inplanes
        outplanes = int(math.floor(self.inplanes // compressionRate))
        self.inplanes = outplanes
        return Transition(inplanes, outplanes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(self.avgpool(x).flatten(1))


def densenet(
    depth: int = 22,
    num_classes: int = 10,
    growthRate: int = 12,
    compressionRate: int = 2,
    dropRate: float = 0,
    block: type = Bottleneck,
) -> DenseNet:
    """CIFAR DenseNet, depth 22 and growth rate 12 by default."""
    return DenseNet(depth=depth, block=block, dropRate=dropRate, num_classes=num_classes,
                    growthRate=growthRate, compressionRate=compressionRate)
