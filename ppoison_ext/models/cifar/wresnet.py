"""Wide ResNets for 32×32 inputs (xternalz ``WideResNet-pytorch``, via
the reference's ``knockoff/models/cifar/wresnet.py``; its unused ``wrn.py`` is not ported)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import he_conv_unit_bn_

__all__ = ["WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class BasicBlock(nn.Module):
    """Pre-activation wide block. When the width changes, the shortcut 1×1 conv is
    applied to the *activated* input (``relu1(bn1(x))``), as in the reference."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, block: type, stride: int, dropRate: float = 0.0
    ):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
                for i in range(int(nb_layers))
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: conv 3→16, three blocks of 16/32/64·widen channels,
    BN → ReLU → 8×8 average pool → ``fc = Linear(64·widen, K)``.

    Init: conv weights N(0, 2/(k·k·C_out)), BN weight 1 / bias 0, ``fc`` bias 0.
    """

    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, dropRate: float = 0.0) -> None:
        super().__init__()
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, n_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(n_channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(n_channels[3], num_classes)
        self.nChannels = n_channels[3]
        he_conv_unit_bn_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


def wrn_16_1(num_classes: int = 10) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=1)


def wrn_16_2(num_classes: int = 10) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=2)


def wrn_40_1(num_classes: int = 10) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=1)


def wrn_40_2(num_classes: int = 10) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=2)
