"""ResNet for 32×32 inputs (bearpaw ``models/cifar/resnet.py``).

The names follow the reference's zoo, not the depths: ``resnet18``, ``resnet34`` and
``resnet50`` are the CIFAR ResNets of depth **20, 32 and 56** (BasicBlock, widths
16-32-64, ``fc = Linear(64, K)``), not the ImageNet ResNet-18/34/50.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type, Union

from torch import Tensor, nn

from ._init import he_conv_unit_bn_

__all__ = ["ResNet", "resnet", "resnet18", "resnet34", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def block_depth(depth: int, block_name: str) -> int:
    """Blocks per stage of a CIFAR (Pre)ResNet of ``depth``: (depth−2)/6 with BasicBlock,
    (depth−2)/9 with Bottleneck."""
    per_block = {"basicblock": 6, "bottleneck": 9}.get(block_name.lower())
    if per_block is None:
        raise ValueError(f"block_name must be 'BasicBlock' or 'Bottleneck', got {block_name!r}")
    if (depth - 2) % per_block != 0:
        examples = "20, 32, 44, 56, 110" if per_block == 6 else "20, 29, 47, 56, 110"
        raise ValueError(f"with {block_name}, depth must be {per_block}n+2 ({examples}, ...), got {depth}")
    return (depth - 2) // per_block


def block_for(depth: int, block_name: str) -> Tuple[Type[Union[BasicBlock, Bottleneck]], int]:
    """The block class and blocks per stage for a CIFAR ResNet of ``depth``."""
    n = block_depth(depth, block_name)
    return (BasicBlock if block_name.lower() == "basicblock" else Bottleneck), n


class ResNet(nn.Module):
    """CIFAR ResNet: conv 3→16, three stages of 16/32/64·expansion channels
    (strides 1, 2, 2), 8×8 average pool, ``fc = Linear(64·expansion, K)``.

    Init: conv weights N(0, 2/(k·k·C_out)), BN weight 1 / bias 0, ``fc`` PyTorch default.
    """

    def __init__(self, depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> None:
        super().__init__()
        block, n = block_for(depth, block_name)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        he_conv_unit_bn_(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet(depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> ResNet:
    """CIFAR ResNet of any valid ``depth`` (6n+2 for BasicBlock, 9n+2 for Bottleneck)."""
    return ResNet(depth=depth, num_classes=num_classes, block_name=block_name)


def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-**20** (the reference zoo's name)."""
    return ResNet(depth=20, num_classes=num_classes)


def resnet34(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-**32** (the reference zoo's name)."""
    return ResNet(depth=32, num_classes=num_classes)


def resnet50(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-**56** (the reference zoo's name)."""
    return ResNet(depth=56, num_classes=num_classes)
