"""ResNeXt for 32×32 inputs (prlz77 ``ResNeXt.pytorch``, via the reference's
``knockoff/models/cifar/resnext.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CifarResNeXt", "resnext"]


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck, type C (grouped 3×3 conv)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int, widen_factor: int):
        super().__init__()
        d = cardinality * out_channels // widen_factor
        self.conv_reduce = nn.Conv2d(in_channels, d, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(
            d, d, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
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

    The classifier input is hard-wired to 1024 (= 256·4), as in the reference, so only
    ``widen_factor=4`` builds a working model.

    Init: ``classifier`` weight Kaiming-normal (fan-in); every parameter named ``*conv*.weight``
    Kaiming-normal (fan-out); ``*bn*.weight`` 1; all biases 0.
    """

    def __init__(
        self, cardinality: int, depth: int, num_classes: int, widen_factor: int = 4, dropRate: float = 0
    ):
        super().__init__()
        self.cardinality = cardinality
        self.depth = depth
        self.block_depth = (depth - 2) // 9
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.output_size = 64
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
            block.add_module(
                f"{name}_bottleneck_{i}",
                ResNeXtBottleneck(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    pool_stride if i == 0 else 1,
                    self.cardinality,
                    self.widen_factor,
                ),
            )
        return block

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        x = F.avg_pool2d(x, 8, 1)
        return self.classifier(x.flatten(1))


def resnext(num_classes: int = 10, widen_factor: int = 4, dropRate: float = 0) -> CifarResNeXt:
    """CIFAR ResNeXt-29 with cardinality 16 and widen factor 4 (fc 1024→K)."""
    return CifarResNeXt(cardinality=16, depth=29, num_classes=num_classes, widen_factor=widen_factor,
                        dropRate=dropRate)
