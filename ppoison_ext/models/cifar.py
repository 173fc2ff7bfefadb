"""CIFAR-family architectures (32×32 inputs), from bearpaw's ``pytorch-classification``
(AlexNet, VGG, ResNet, PreResNet, DenseNet), prlz77's ``ResNeXt.pytorch`` and xternalz's
``WideResNet-pytorch``, with the layer names of Knockoff Nets' ``knockoff/models/cifar`` (so its
checkpoints load by name). Every model ends in one ``nn.Linear`` whose output is the logits.
``resnet18``, ``resnet34`` and ``resnet50`` are the CIFAR ResNets of depth **20, 32 and 56**
(BasicBlock, widths 16-32-64), not the ImageNet ResNet-18/34/50.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def he_conv_unit_bn_(model: nn.Module, *, zero_linear_bias: bool = False, vgg: bool = False) -> None:
    """bearpaw's init: conv weights N(0, 2/(k·k·C_out)), BN weight 1 and bias 0.

    Conv biases and Linear layers keep PyTorch's default init, except that
    ``zero_linear_bias`` zeroes Linear biases (the WideResNet variant) and ``vgg`` zeroes conv
    biases and draws Linear weights from N(0, 0.01) with zero biases (the VGG variant).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if vgg and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and (zero_linear_bias or vgg):
            if vgg:
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class AlexNet(nn.Module):
    """Five convolutions (64-192-384-256-256, first one 11×11 stride 4) with three
    2×2 max pools, then a single ``classifier = Linear(256, K)``. PyTorch default init."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


alexnet = AlexNet


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
    ``classifier = Linear(512, K)``; init :func:`he_conv_unit_bn_` with ``vgg=True``."""

    def __init__(self, features: nn.Sequential, num_classes: int = 10) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(512, num_classes)
        he_conv_unit_bn_(self, vgg=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


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


def _vgg(cfg: str, batch_norm: bool, num_classes: int = 10) -> VGG:
    return VGG(make_layers(CFGS[cfg], batch_norm=batch_norm), num_classes=num_classes)


vgg11, vgg11_bn = partial(_vgg, "A", False), partial(_vgg, "A", True)
vgg13, vgg13_bn = partial(_vgg, "B", False), partial(_vgg, "B", True)
vgg16, vgg16_bn = partial(_vgg, "D", False), partial(_vgg, "D", True)
vgg19, vgg19_bn = partial(_vgg, "E", False), partial(_vgg, "E", True)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
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

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class _Stages(nn.Module):
    """What ResNet and PreResNet share: the block choice and the three stages."""

    blocks: Dict[str, type] = {}
    preact = False  # pre-activation: no BN after the stem conv nor after a shortcut projection

    def _stages(self, depth: int, block_name: str) -> type:
        n = block_depth(depth, block_name)
        block = self.blocks[block_name.lower()]
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        return block

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            projection = [nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                                    bias=False)]
            if not self.preact:
                projection.append(nn.BatchNorm2d(planes * block.expansion))
            downsample = nn.Sequential(*projection)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


class ResNet(_Stages):
    """CIFAR ResNet: conv 3→16, three stages of 16/32/64·expansion channels
    (strides 1, 2, 2), 8×8 average pool, ``fc = Linear(64·expansion, K)``; init
    :func:`he_conv_unit_bn_`."""

    blocks = {"basicblock": BasicBlock, "bottleneck": Bottleneck}

    def __init__(self, depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> None:
        super().__init__()
        block = self._stages(depth, block_name)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        he_conv_unit_bn_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class PreResNet(_Stages):
    """CIFAR pre-activation ResNet: conv 3→16, three stages (16/32/64·expansion
    channels), final BN → ReLU → 8×8 average pool → ``fc = Linear(64·expansion, K)``.
    Shortcut projections are a bare 1×1 conv (no BN). Init as :class:`ResNet`."""

    blocks = {"basicblock": PreBasicBlock, "bottleneck": PreBottleneck}
    preact = True

    def __init__(self, depth: int, num_classes: int = 10, block_name: str = "BasicBlock") -> None:
        super().__init__()
        block = self._stages(depth, block_name)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        he_conv_unit_bn_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


#: Any valid depth (6n+2 for BasicBlock, 9n+2 for Bottleneck): ``resnet(depth, num_classes, block_name)``.
resnet = ResNet
preresnet = PreResNet
#: CIFAR ResNet-20, -32 and -56 (the names are not the depths).
resnet18 = partial(ResNet, 20)
resnet34 = partial(ResNet, 32)
resnet50 = partial(ResNet, 56)


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck, type C (grouped 3×3 conv)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int, widen_factor: int):
        super().__init__()
        d = cardinality * out_channels // widen_factor
        self.conv_reduce = nn.Conv2d(in_channels, d, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(d, d, kernel_size=3, stride=stride, padding=1, groups=cardinality,
                                   bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, out_channels, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module(
                "shortcut_conv",
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0, bias=False),
            )
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        b = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        b = F.relu(self.bn(self.conv_conv(b)), inplace=True)
        b = self.bn_expand(self.conv_expand(b))
        return F.relu(self.shortcut(x) + b, inplace=True)


class CifarResNeXt(nn.Module):
    """CIFAR ResNeXt: conv 3→64, three stages of ``(depth−2)//9`` bottlenecks with
    64/128/256·widen_factor channels, 8×8 average pool, ``classifier = Linear(1024, K)``.

    The classifier input is hard-wired to 1024 (= 256·4), so only ``widen_factor=4`` builds a
    working model. Init: ``classifier`` weight Kaiming-normal (fan-in); every ``*conv*.weight``
    Kaiming-normal (fan-out); ``*bn*.weight`` 1; all biases 0.
    """

    def __init__(self, cardinality: int, depth: int, num_classes: int = 10, widen_factor: int = 4,
                 dropRate: float = 0):
        super().__init__()
        self.cardinality = cardinality
        self.depth = depth
        self.block_depth = (depth - 2) // 9
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.stages = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]

        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.stage_1 = self.block("stage_1", self.stages[0], self.stages[1], 1)
        self.stage_2 = self.block("stage_2", self.stages[1], self.stages[2], 2)
        self.stage_3 = self.block("stage_3", self.stages[2], self.stages[3], 2)
        self.classifier = nn.Linear(1024, num_classes)
        nn.init.kaiming_normal_(self.classifier.weight)
        for key, p in self.named_parameters():
            leaf = key.split(".")[-1]
            if leaf == "weight":
                if "conv" in key:
                    nn.init.kaiming_normal_(p, mode="fan_out")
                if "bn" in key:
                    nn.init.ones_(p)
            elif leaf == "bias":
                nn.init.zeros_(p)

    def block(self, name: str, in_channels: int, out_channels: int, pool_stride: int = 2) -> nn.Sequential:
        """``block_depth`` bottlenecks; the first one changes width and stride."""
        block = nn.Sequential()
        for i in range(self.block_depth):
            bottleneck = ResNeXtBottleneck(in_channels if i == 0 else out_channels, out_channels,
                                           pool_stride if i == 0 else 1, self.cardinality, self.widen_factor)
            block.add_module(f"{name}_bottleneck_{i}", bottleneck)
        return block

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        x = F.avg_pool2d(x, 8, 1)
        return self.classifier(x.flatten(1))


#: CIFAR ResNeXt-29 with cardinality 16 and widen factor 4 (fc 1024→K).
resnext = partial(CifarResNeXt, 16, 29)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block. When the width changes, the shortcut 1×1 conv is
    applied to the *activated* input (``relu1(bn1(x))``)."""

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
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, kernel_size=1,
                                                                    stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        if not self.equalInOut:
            x = out
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, block: type, stride: int,
                 dropRate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[block(in_planes if i == 0 else out_planes, out_planes,
                                           stride if i == 0 else 1, dropRate) for i in range(int(nb_layers))])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: conv 3→16, three blocks of 16/32/64·widen channels,
    BN → ReLU → 8×8 average pool → ``fc = Linear(64·widen, K)``; init :func:`he_conv_unit_bn_`
    with zero ``fc`` bias."""

    def __init__(self, depth: int, num_classes: int = 10, widen_factor: int = 1, dropRate: float = 0.0) -> None:
        super().__init__()
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, n_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], WideBasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], WideBasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], WideBasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(n_channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(n_channels[3], num_classes)
        he_conv_unit_bn_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


wrn_16_1 = partial(WideResNet, 16, widen_factor=1)
wrn_16_2 = partial(WideResNet, 16, widen_factor=2)
wrn_40_1 = partial(WideResNet, 40, widen_factor=1)
wrn_40_2 = partial(WideResNet, 40, widen_factor=2)


class DenseBottleneck(nn.Module):
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


class DenseBasicBlock(nn.Module):
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


class DenseTransition(nn.Module):
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
    Bottleneck blocks ((depth−4)/6 per block), compression 2. Init as the CIFAR ResNet."""

    def __init__(self, depth: int = 22, num_classes: int = 10, growthRate: int = 12, compressionRate: int = 2,
                 dropRate: float = 0, block: type = DenseBottleneck) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3 if block is DenseBasicBlock else (depth - 4) // 6
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

    def _make_transition(self, compressionRate: int) -> DenseTransition:
        inplanes = self.inplanes
        outplanes = int(math.floor(self.inplanes // compressionRate))
        self.inplanes = outplanes
        return DenseTransition(inplanes, outplanes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(self.avgpool(x).flatten(1))


densenet = DenseNet


#: name -> constructor, in Knockoff Nets' export order.
BUILDERS = {
    "alexnet": alexnet, "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg13": vgg13, "vgg13_bn": vgg13_bn,
    "vgg16": vgg16, "vgg16_bn": vgg16_bn, "vgg19": vgg19, "vgg19_bn": vgg19_bn,
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet": resnet, "resnext": resnext,
    "wrn_16_1": wrn_16_1, "wrn_16_2": wrn_16_2, "wrn_40_1": wrn_40_1, "wrn_40_2": wrn_40_2,
    "preresnet": preresnet, "densenet": densenet,
}

__all__ = ["BUILDERS", "AlexNet", "DenseNet", "PreResNet", "ResNet", "CifarResNeXt", "VGG", "WideResNet",
           *BUILDERS]
